"""Exact resume: a run killed with SIGKILL mid-training, or stopped by SIGTERM, and resumed ends
bit-identical to an uninterrupted run (the supervised quickstart, and the tiny zoo recipes of every
other objective); a half-written checkpoint is never loaded; the learning-rate schedule it resumes
into has its stated values."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

from bigmodel import api
from bigmodel.cli import main
from bigmodel.recipe import OptimConfig, resolve
from bigmodel.train import checkpoint
from bigmodel.train.trainer import lr_at
from tests.helpers import REPO, env

ARGS = ["fractals-vit", "run.tiny=true", "optim.steps=16", "run.checkpoint_every=2", "run.log_every=1",
        "optim.accum_steps=2"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = checkpoint.latest(run_dir)
    assert last is not None and last.name == "step_00000016"
    return load_file(str(last / "model.safetensors"))


@pytest.mark.slow  # a CLI process killed, then two runs of 16 steps; `make test-all`
def test_sigkill_then_resume_is_bit_exact(tmp_path, capsys) -> None:
    """Only the killed run needs a process of its own; the uninterrupted run and the resume run
    here (``bigmodel.cli.main``), with the same single thread as a CLI process."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["pretrain", *ARGS, f"run.out={whole}"]) == 0

    p = subprocess.Popen([sys.executable, "-m", "bigmodel", "pretrain", *ARGS, f"run.out={killed}"],
                         cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoints" / "step_00000006").exists():
        assert p.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    stopped_at = checkpoint.latest(killed)
    assert stopped_at is not None and stopped_at.name < "step_00000016"

    capsys.readouterr()
    assert main(["pretrain", *ARGS, f"run.out={killed}"]) == 0  # same command: resumes automatically
    assert "resuming from" in capsys.readouterr().out
    a, b = final_weights(whole), final_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # no duplicated or missing log lines across the kill


def test_resume_flag_and_different_recipe_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    tiny = ["fractals-vit", "run.tiny=true", "architecture.image_size=16", "data.image_size=16", "run.figures=false"]
    assert main(["pretrain", *tiny, f"run.out={out}"]) == 0
    assert main(["pretrain", *tiny, "optim.lr=0.5", f"run.out={out}"]) == 2
    assert "holds a run of a different recipe" in capsys.readouterr().err
    assert main(["pretrain", "--resume", str(out)]) == 0
    assert "resuming from" in capsys.readouterr().out


def test_half_written_checkpoints_are_never_loaded(tmp_path) -> None:
    model = torch.nn.Linear(2, 2)
    folder = tmp_path / "checkpoints"
    checkpoint.save(folder, 4, model, {"step": 4}, {})
    # what a kill during the next save can leave behind: a temp folder, and (never produced by
    # save, but worth refusing) a final-named folder without its meta.json
    (folder / ".tmp-step_00000006").mkdir()
    (folder / ".tmp-step_00000006" / "model.safetensors").write_bytes(b"\x00" * 10)
    (folder / "step_00000008").mkdir()
    (folder / "step_00000008" / "model.safetensors").write_bytes(b"truncated")
    assert checkpoint.latest(tmp_path).name == "step_00000004"
    checkpoint.save(folder, 6, model, {"step": 6}, {})
    assert not (folder / ".tmp-step_00000006").exists()  # stale temp folders are cleared
    assert checkpoint.latest(folder).name == "step_00000006"
    assert checkpoint.load_state(checkpoint.latest(folder))["step"] == 6


@contextlib.contextmanager
def sigterm_after(updates: int) -> Iterator[None]:
    """Send this process SIGTERM right after the ``updates``-th optimizer step (a global optimizer
    hook: nothing of the trainer is patched). Refuses to when no SIGTERM handler is installed, which
    would kill the test run itself."""
    count = 0

    def hook(opt, args, kwargs) -> None:
        nonlocal count
        count += 1
        if count == updates:
            handler = signal.getsignal(signal.SIGTERM)
            assert handler not in (signal.SIG_DFL, None), "training installed no SIGTERM handler"
            os.kill(os.getpid(), signal.SIGTERM)

    handle = register_optimizer_step_post_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.parametrize("name", ["mae-vit", "simclr-resnet", "igpt", "mae-vit-moe"])
def test_zoo_recipe_stopped_and_resumed_is_bit_exact(name, tmp_path, mnist_npz) -> None:
    """MAE (global-RNG masks), SimCLR (two augmented views), iGPT (a fitted palette) and V-MoE (routing)
    resume exactly: 4 tiny steps straight vs stopped by SIGTERM after step 1 and resumed."""
    def recipe(out: Path):
        return resolve(name, ["run.tiny=true", "run.precision=fp32", "run.log_every=1", f"data.path={mnist_npz}",
                              f"run.out={out}", "run.figures=false", "run.deterministic=true"])  # for a GPU

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    quiet = Console(quiet=True)
    assert api.run_pipeline(recipe(whole), quiet, transfer=False)["pretrain"]["steps_done"] == 4
    with sigterm_after(1):
        first = api.run_pipeline(recipe(stopped), quiet, transfer=False)["pretrain"]
    assert (first["stopped"], first["steps_done"]) == (True, 1)
    assert checkpoint.latest(stopped).name == "step_00000001"
    assert api.run_pipeline(recipe(stopped), quiet, transfer=False)["pretrain"]["steps_done"] == 4

    a = load_file(str(checkpoint.latest(whole) / "model.safetensors"))
    b = load_file(str(checkpoint.latest(stopped) / "model.safetensors"))
    assert checkpoint.latest(stopped).name == "step_00000004" and a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    straight, resumed = _metrics(whole), _metrics(stopped)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight]
    cfg = recipe(whole).optim
    assert [m["lr"] for m in straight] == [lr_at(s, cfg) for s in range(4)]  # step s logs as s + 1


def test_lr_schedule_values() -> None:
    """Linear warm-up to lr over warmup_steps (step s trains at lr·(s+1)/warmup), then a half cosine
    from lr at the end of warm-up to lr·min_lr_ratio at step == steps."""
    cfg = OptimConfig(lr=1e-3, steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4, rel=1e-12)  # first step: lr / warmup_steps
    assert lr_at(4, cfg) == pytest.approx(5e-4, rel=1e-12)
    assert lr_at(9, cfg) == pytest.approx(1e-3, rel=1e-12)  # last warm-up step reaches lr
    assert lr_at(10, cfg) == pytest.approx(1e-3, rel=1e-12)  # cosine starts at lr
    assert lr_at(55, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5), rel=1e-12)  # mid cosine: halfway to the floor
    # last trained step (99): 0.5·(1 + cos(π·89/90)) = sin²(π/180)
    assert lr_at(99, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * math.sin(math.pi / 180) ** 2), rel=1e-12)
    assert lr_at(100, cfg) == pytest.approx(1e-4, rel=1e-12)  # the floor, lr · min_lr_ratio
    no_warmup = OptimConfig(lr=2e-3, steps=4, warmup_steps=0, min_lr_ratio=0.0)
    assert [lr_at(s, no_warmup) for s in range(4)] == pytest.approx(
        [2e-3, 1e-3 * (1 + math.cos(math.pi / 4)), 1e-3, 1e-3 * (1 + math.cos(3 * math.pi / 4))], rel=1e-12)
