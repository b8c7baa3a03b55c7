"""Several processes (gloo, CPU): 2 processes end with the weights of 1 for the same global batch
(supervised with per-image crops, SimCLR with gathered negatives and global BatchNorm, MAE with
per-image masks, all with gradient accumulation where it matters); FSDP2 trains and its checkpoint
resumes on 1 process; SIGTERM to a torchrun run leaves a checkpoint that completes on 1 and on 4
processes; a non-finite loss on one rank stops both and keeps the previous checkpoint; activation
checkpointing leaves the gradients unchanged; ``run.compile`` trains a tiny recipe.

The 2-process runs share one launch (:func:`two`): starting processes that import torch is most of
the cost. The 1-process references run in this process.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from rich.console import Console

from bigmodel.commands.pretrain import pretrain
from bigmodel.recipe import resolve
from bigmodel.train import build, checkpoint, distributed
from tests.helpers import REPO, env
from tests.train import dist_cases as cases

TOL = 1e-5


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def assert_close_weights(a: Path, b: Path) -> None:
    wa, wb = cases.final_weights(a), cases.final_weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < TOL, f"weights differ by {worst}"


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """Every 2-process case, trained in one group of 2 processes."""
    out = tmp_path_factory.mktemp("two")
    for case in ("ddp_resumed", "fsdp_resumed"):  # 6 steps on one process; the last 3 again on two
        cases.train(case, out / f"{case}-whole")
        shutil.copytree(out / f"{case}-whole", out / case)
        shutil.rmtree(out / case / "checkpoints" / "step_00000006")
    for p in cases.launch(2, out, "supervised", "simclr", "mae", "fsdp", "nonfinite", "ddp_resumed", "fsdp_resumed"):
        assert p.returncode == 0, p.stderr[-4000:]
    return out


@pytest.mark.slow  # uses `two`: a group of 2 processes; `make test-all`
@pytest.mark.parametrize("case", ["supervised", "simclr", "mae"])
def test_two_processes_end_with_the_weights_of_one(two: Path, tmp_path: Path, case: str):
    cases.train(case, tmp_path)
    assert_close_weights(tmp_path, two / case)
    losses = [[json.loads(ln)["loss"] for ln in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path, two / case)]
    assert losses[0] == pytest.approx(losses[1], rel=TOL)  # the mean over the ranks is the loss of one process
    assert steps_logged(two / case) == [1, 2, 3, 4]  # written once, by rank 0
    meta = checkpoint.load_meta(checkpoint.latest(two / case))
    assert (meta["format"], meta["world"], meta["step"]) == ("dcp", 2, 4)
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rng-00000.pt", "rng-00001.pt"} == set(meta["files"])
    assert json.loads((two / case / "result-1.json").read_text())["processes"] == 2


@pytest.mark.slow  # uses `two`: a group of 2 processes; `make test-all`
def test_a_sharded_checkpoint_serves_transfer_and_analysis_on_one_process(two: Path):
    """load_weights (used by transfer, analysis and reports) reads the model part of a DCP
    checkpoint, e.g. the backbone alone, like a safetensors one."""
    found = checkpoint.latest(two / "supervised")
    recipe = resolve(str(two / "supervised" / "recipe.yaml"))
    net = build.backbone(recipe.architecture)
    checkpoint.load_weights(found, net, prefix="backbone.")
    whole = checkpoint.read_weights(found)
    assert all(torch.equal(v, whole[f"backbone.{k}"]) for k, v in net.state_dict().items())
    with pytest.raises(checkpoint.CheckpointError, match="lacks weights the model needs"):
        checkpoint.load_weights(found, build.backbone(resolve("simclr-resnet").architecture), prefix="backbone.")


@pytest.mark.slow  # uses `two`: a group of 2 processes; `make test-all`
def test_fsdp_trains_and_its_checkpoint_resumes_on_one_process(two: Path, tmp_path: Path):
    whole = tmp_path / "whole"
    cases.train("fsdp", whole)
    assert_close_weights(whole, two / "fsdp")  # FSDP2 on 2 processes computes what one process does
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "fsdp", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")  # as if stopped after the step-3 checkpoint
    out = cases.train("fsdp", resumed)
    assert (out["steps_done"], out["processes"]) == (6, 1)
    assert checkpoint.load_meta(checkpoint.latest(resumed)).get("format") != "dcp"  # one process: safetensors
    assert_close_weights(whole, resumed)
    assert steps_logged(resumed) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # uses `two`: a group of 2 processes; `make test-all`
@pytest.mark.parametrize("case", ["ddp_resumed", "fsdp_resumed"])
def test_a_one_process_checkpoint_resumes_on_two(two: Path, case: str):
    """A safetensors checkpoint of one process continues on two, DDP or FSDP2 (its whole tensors
    sharded on load), to the weights of the run that stayed on one."""
    assert checkpoint.load_meta(checkpoint.latest(two / case))["world"] == 2
    assert_close_weights(two / f"{case}-whole", two / case)
    assert steps_logged(two / case) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # uses `two`: a group of 2 processes; `make test-all`
def test_a_non_finite_loss_on_one_rank_stops_both_and_keeps_the_previous_checkpoint(two: Path, tmp_path: Path):
    run = two / "nonfinite"
    for rank in range(2):  # rank 1's loss was NaN at step 3; both stopped there, with the same message
        error = json.loads((run / f"result-{rank}.json").read_text())["error"]
        assert re.match(r"loss became nan at step 3 \(on at least one process\); the last good checkpoint stays", error)
    assert checkpoint.latest(run).name == "step_00000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002"]
    assert steps_logged(run) == [1, 2]
    # the checkpoint kept is good: resumed on one process it ends where an unpoisoned run ends
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    cases.train("nonfinite", whole)
    shutil.copytree(run, resumed)
    cases.train("nonfinite", resumed)
    assert_close_weights(whole, resumed)


@pytest.mark.slow  # torchrun on 2 processes, stopped, then 1 and 4; `make test-all`
def test_sigterm_stops_a_torchrun_run_which_completes_on_one_and_on_four_processes(tmp_path: Path):
    stopped = tmp_path / "stopped"
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(cases.recipe("preempted", stopped).to_yaml())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    p = subprocess.Popen([*torchrun, "-m", "bigmodel", "pretrain", str(recipe_file)], cwd=REPO, env=env(),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((stopped / "metrics.jsonl").exists() and (stopped / "metrics.jsonl").read_text().strip()):
        assert p.poll() is None, f"the run ended before the signal: {p.communicate()}"
        assert time.time() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)  # as a cluster does: to the launcher, which passes it to every worker
    out, err = p.communicate(timeout=120)
    k = int(re.search(r"stopped at step (\d+); checkpoint saved", out).group(1))
    assert 1 <= k < 24, out
    assert checkpoint.latest(stopped).name == f"step_{k:08d}" and checkpoint.is_sharded(checkpoint.latest(stopped))
    assert steps_logged(stopped) == list(range(1, k + 1))

    whole, on_one, on_four = tmp_path / "whole", tmp_path / "on_one", tmp_path / "four" / "preempted"
    cases.train("preempted", whole)
    shutil.copytree(stopped, on_one)
    shutil.copytree(stopped, on_four)
    cases.train("preempted", on_one)
    assert_close_weights(whole, on_one)
    for proc in cases.launch(4, on_four.parent, "preempted"):  # the launch trains into on_four
        assert proc.returncode == 0, proc.stderr[-4000:]
    assert checkpoint.load_meta(checkpoint.latest(on_four))["world"] == 4
    assert_close_weights(whole, on_four)
    assert steps_logged(on_one) == steps_logged(on_four) == list(range(1, 25))


def _grads(model: torch.nn.Module, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)  # MAE's masks
    model.zero_grad()
    model(views, labels)["loss"].backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients(synthetic_data):
    for name in ("fractals-vit", "mae-vit", "simclr-resnet"):  # ViT blocks, ViT + MAE decoder blocks, ResNetV2 stages
        recipe = resolve(name, ["run.tiny=true"])
        data, model = build.experiment(recipe)
        images, labels = next(build.batches(data, 4, seed=0))
        views = model.views(images, torch.Generator().manual_seed(0))
        plain = _grads(model, views, labels)
        wrapped = distributed.checkpoint_blocks(model)
        assert wrapped == len(distributed.blocks(model)) > 0
        recomputed = _grads(model, views, labels)
        assert plain.keys() == recomputed.keys()
        for k in plain:
            torch.testing.assert_close(recomputed[k], plain[k], rtol=1e-5, atol=1e-7, msg=f"{name}: {k}")
        distributed.unwrap(model, model)
        assert all("forward" not in vars(b) for b in distributed.blocks(model))


def test_compile_and_activation_checkpointing_train_a_tiny_recipe(tmp_path: Path, monkeypatch):
    """run.compile=true compiles every block (here with the aot_eager backend: inductor's C++
    build takes minutes on a small CPU; the tracing and the autograd graph are the same), with
    activation checkpointing on top; the losses are those of the plain run."""
    monkeypatch.setattr(distributed, "COMPILE_BACKEND", "aot_eager")
    compiled_modules = []
    real_compile = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: compiled_modules.append(self) or real_compile(self, **kw))
    losses = {}
    for flags in ((), ("run.compile=true", "run.activation_checkpointing=true")):
        recipe = resolve("fractals-vit", ["run.tiny=true", "run.precision=fp32", "optim.steps=3", "run.log_every=1",
                                        f"run.out={tmp_path / str(len(flags))}", *flags])
        data, model = build.experiment(recipe)
        pretrain(recipe, Path(recipe.run.out), data, model, Console(quiet=True))
        lines = (Path(recipe.run.out) / "metrics.jsonl").read_text().splitlines()
        losses[flags] = [json.loads(ln)["loss"] for ln in lines]
        assert all(m._compiled_call_impl is None for m in compiled_modules)  # plain again (transfer, analysis)
    assert compiled_modules == distributed.blocks(model) and len(compiled_modules) == 4  # the tiny ViT's blocks
    plain, compiled = losses.values()
    assert compiled == pytest.approx(plain, rel=1e-5)


@pytest.mark.slow  # torchrun on 2 processes, end to end; `make test-all`
def test_under_torchrun_only_rank_zero_transfers_and_reports(tmp_path: Path):
    """``bigmodel run`` on 2 processes: one banner, one transfer table, one report, both ranks exit 0."""
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    p = subprocess.run([*torchrun, "-m", "bigmodel", "run", "fractals-vit", "run.tiny=true", "optim.steps=4",
                        f"run.out={out}"], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.count("bigmodel run →") == p.stdout.count("report: ") == 1, p.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["pretrain"]["processes"] == 2 and report["pretrain"]["steps_done"] == 4
