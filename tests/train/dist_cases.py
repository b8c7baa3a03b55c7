"""Tiny pretraining runs shared by the multi-process tests and their one-process references.

``python -m tests.train.dist_cases OUT CASE...`` trains each case into ``OUT/CASE`` in the process
group that the launcher's environment describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...), as
``bigmodel pretrain`` does under torchrun, and writes ``OUT/CASE/result-RANK.json`` (``"ok"`` or the
error). :func:`launch` starts such a group of plain processes (faster than torchrun's agent).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

from bigmodel.commands.pretrain import pretrain
from bigmodel.objectives.base import Objective
from bigmodel.recipe import Recipe, validate
from bigmodel.train import build, checkpoint, distributed
from bigmodel.train.run_dir import open_run
from bigmodel.train.trainer import NonFiniteLoss
from tests.helpers import REPO, env

VIT = {"name": "vit", "size": "nano", "image_size": 16, "patch_size": 4, "in_chans": 1}
DATA = {"name": "fractals", "classes": 4, "images_per_class": 8, "image_size": 16, "channels": 1, "points": 500}
# SGD: its update is linear in the gradient, so float noise stays float noise (AdamW turns the noise
# of a near-zero gradient into a ±lr step, and the comparison into a test of luck)
OPTIM = {"name": "sgd", "batch_size": 8, "steps": 4, "warmup_steps": 1, "lr": 0.05}
RUN = {"precision": "fp32", "checkpoint_every": 2, "log_every": 1, "seed": 3}
MONITOR = {"task": "digits", "protocol": "knn", "k": 5, "every": 2, "limit": 120}

CASES: dict[str, dict[str, Any]] = {
    # crops and flips drawn per image: each rank must draw what one process draws for its rows
    "supervised": {"objective": {"name": "supervised", "crop_pad": 2, "flip": True}, "optim": {"accum_steps": 2}},
    # global negatives and global BatchNorm in the projection head, within each micro-batch
    "simclr": {"objective": {"name": "simclr", "proj_hidden": 32, "proj_dim": 16, "crop_scale": [0.5, 1.0],
                             "blur_prob": 0.5}, "optim": {"accum_steps": 2}},
    "mae": {"objective": {"name": "mae", "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2}},
    "fsdp": {"objective": {"name": "supervised", "crop_pad": 2}, "optim": {"steps": 6},
             "run": {"strategy": "fsdp", "checkpoint_every": 3}},
    "nonfinite": {"objective": {"name": "supervised"}, "optim": {"steps": 6}},
    # started on one process (safetensors checkpoints), continued on two
    "ddp_resumed": {"objective": {"name": "supervised", "crop_pad": 2}, "optim": {"steps": 6, "accum_steps": 2},
                    "run": {"checkpoint_every": 3}},
    "fsdp_resumed": {"objective": {"name": "supervised", "crop_pad": 2}, "optim": {"steps": 6},
                     "run": {"strategy": "fsdp", "checkpoint_every": 3}},
    # run.monitor: under DDP rank 0 scores alone; under FSDP2 every rank gathers the shards first (an lr at
    # which the probe's score moves within 4 steps)
    "monitor_ddp": {"objective": {"name": "supervised", "crop_pad": 2}, "optim": {"lr": 0.3},
                    "run": {"monitor": MONITOR}},
    "monitor_fsdp": {"objective": {"name": "supervised", "crop_pad": 2}, "optim": {"lr": 0.3},
                     "run": {"strategy": "fsdp", "monitor": MONITOR}},
    # long enough to be stopped mid-way; resumed on 1 and on 4 processes (2 rows per rank and step)
    "preempted": {"objective": {"name": "supervised", "crop_pad": 2, "flip": True}, "optim": {"steps": 24},
                  "run": {"checkpoint_every": 1000}},
}


def recipe(case: str, out: Path, **run: Any) -> Recipe:
    spec = CASES[case]
    return validate({"architecture": VIT, "data": DATA, "objective": spec["objective"],
                     "optim": {**OPTIM, **spec.get("optim", {})},
                     "run": {**RUN, **spec.get("run", {}), **run, "out": str(out)}})


def train(case: str, out: Path, **run: Any) -> dict[str, Any]:
    """Pretrain ``case`` into ``out`` (resuming from a checkpoint there) as ``bigmodel pretrain``
    does, in one process or in every rank of a group."""
    r = recipe(case, out, **run)
    data, model = build.experiment(r)
    with open_run(r, Console(quiet=True)) as run_dir:
        return pretrain(r, run_dir, data, model, Console(quiet=True))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint.read_weights(checkpoint.latest(run_dir))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, *cases: str, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Run ``cases`` in ``world`` processes forming one group; returns each rank's completed process."""
    port = free_port()
    procs = []
    for rank in range(world):
        e = {**env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
             "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "tests.train.dist_cases", str(out), *cases], cwd=REPO,
                                      env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def _poison_rank_1(step: int) -> list[Any]:
    """On rank 1 only, the objective's forward of training step ``step`` (the first after ``step - 1``
    optimizer steps) returns a NaN loss. Counting optimizer steps, not forwards, leaves out the memory
    check's probe forward before step 1. Returns the hook handles."""
    steps_done, poisoned = [0], [False]

    def count(opt: Any, args: Any, kwargs: Any) -> None:
        steps_done[0] += 1

    def hook(module: Any, args: Any, out: Any) -> Any:
        if isinstance(module, Objective) and distributed.rank() == 1 and not poisoned[0] \
                and steps_done[0] == step - 1:
            poisoned[0] = True
            return {**out, "loss": out["loss"] * float("nan")}
        return out

    return [register_module_forward_hook(hook), register_optimizer_step_post_hook(count)]


def main(out: Path, cases: list[str]) -> None:
    torch.set_num_threads(1)
    with distributed.session():
        for case in cases:
            hooks = _poison_rank_1(3) if case == "nonfinite" else []
            try:
                result: Any = train(case, out / case)
            except NonFiniteLoss as e:
                result = {"error": str(e)}
            finally:
                for hook in hooks:
                    hook.remove()
            (out / case).mkdir(parents=True, exist_ok=True)
            (out / case / f"result-{distributed.rank()}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
