"""Stops: SIGTERM to a real pretraining process checkpoints and exits with status 3, and the resumed
run ends bit-identical to an uninterrupted one; a non-finite loss stops the run with one clear line
and a non-zero status, keeping the last good checkpoint intact (it loads and resumes to the
uninterrupted run's weights); a full disk at a checkpoint exits with status 5 and loses nothing; a
metrics line torn by a kill is dropped on resume."""

from __future__ import annotations

import contextlib
import errno
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.nn.modules.module import register_module_forward_hook
from torch.optim.optimizer import register_optimizer_step_post_hook

from bigmodel import cli
from bigmodel.objectives.base import Objective
from bigmodel.train import checkpoint
from tests.helpers import REPO, env

TINY = ["fractals-vit", "run.tiny=true", "run.precision=fp32", "run.log_every=1"]


def weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert [k for k in wa if not torch.equal(wa[k], wb[k])] == []


def steps_logged(run_dir: Path) -> list[int]:
    return [json.loads(ln)["step"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.mark.slow  # a subprocess stopped by a signal, then resumed; `make test-all`
def test_sigterm_checkpoints_exits_3_and_resumes_bit_exact(tmp_path) -> None:
    args = [*TINY, "optim.steps=24", "run.checkpoint_every=1000"]  # no periodic checkpoint before the signal's
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert cli.main(["pretrain", *args, f"run.out={whole}"]) == 0

    p = subprocess.Popen([sys.executable, "-m", "bigmodel", "pretrain", *args, f"run.out={stopped}"], cwd=REPO,
                         env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ((stopped / "metrics.jsonl").exists() and (stopped / "metrics.jsonl").read_text().strip()):
        assert p.poll() is None, f"the run ended before the signal: {p.communicate()}"
        assert time.time() < deadline
        time.sleep(0.01)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == getattr(cli, "EXIT_STOPPED", 3) == 3, err
    k = int(re.search(r"stopped at step (\d+); checkpoint saved", out).group(1))
    assert 1 <= k < 24
    assert checkpoint.latest(stopped).name == f"step_{k:08d}"  # the signal's checkpoint, and only it
    assert steps_logged(stopped) == list(range(1, k + 1))

    assert cli.main(["pretrain", "--resume", str(stopped)]) == 0
    assert checkpoint.latest(stopped).name == "step_00000024"
    assert_same_weights(checkpoint.latest(whole), checkpoint.latest(stopped))
    assert steps_logged(stopped) == list(range(1, 25))


@contextlib.contextmanager
def poisoned_objective(step: int, *, grads_only: bool = False) -> Iterator[None]:
    """Make the objective's forward of training step ``step`` (the first objective forward after
    ``step - 1`` optimizer steps) return a NaN loss (with ``grads_only``: a finite loss whose backward
    yields NaN gradients, as an overflow in the backward pass would). Counting optimizer steps, not
    forwards, leaves out the memory probe's forward before step 1 (so ``step`` must be 2 or more).
    Global forward and optimizer hooks: nothing of the package is patched."""
    steps_done, poisoned = 0, False

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            return grad * float("nan")

    def count(opt, args, kwargs):
        nonlocal steps_done
        steps_done += 1

    def hook(module, args, out):
        nonlocal poisoned
        if not isinstance(module, Objective) or poisoned or steps_done != step - 1:
            return None
        poisoned = True
        return {**out, "loss": NanGrad.apply(out["loss"]) if grads_only else out["loss"] * float("nan")}

    handles = [register_module_forward_hook(hook), register_optimizer_step_post_hook(count)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _diverge(tmp_path: Path, capsys, nan_at: int, grads_only: bool = False) -> tuple[int, str, Path, Path]:
    """An uninterrupted 6-step run, and the same run poisoned at step ``nan_at``."""
    args = [*TINY, "run.checkpoint_every=2"]
    whole, bad = tmp_path / "whole", tmp_path / "bad"
    assert cli.main(["pretrain", *args, f"run.out={whole}"]) == 0
    capsys.readouterr()
    with poisoned_objective(nan_at, grads_only=grads_only):
        status = cli.main(["pretrain", *args, f"run.out={bad}"])
    return status, capsys.readouterr().err, whole, bad


@pytest.mark.slow  # a straight run and a diverging one, then a resume; `make test-all`
def test_non_finite_loss_stops_with_one_line_and_keeps_the_last_good_checkpoint(tmp_path, capsys) -> None:
    status, err, whole, bad = _diverge(tmp_path, capsys, nan_at=5)
    assert status != 0 and status == getattr(cli, "EXIT_DIVERGED", status)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "loss became nan at step 5" in lines[0]
    assert f"last good checkpoint stays in {bad / 'checkpoints'}" in lines[0]
    assert "optim.lr" in lines[0]  # what to try
    last = checkpoint.latest(bad)
    assert last.name == "step_00000004" and steps_logged(bad) == [1, 2, 3, 4]
    assert_same_weights(whole / "checkpoints" / "step_00000004", last)  # intact: the straight run's step 4
    assert cli.main(["pretrain", "--resume", str(bad)]) == 0  # it loads, and resumes to the straight end
    assert_same_weights(checkpoint.latest(whole), checkpoint.latest(bad))


def test_non_finite_gradients_never_reach_a_checkpoint(tmp_path, capsys) -> None:
    status, err, _, bad = _diverge(tmp_path, capsys, nan_at=4, grads_only=True)  # 4: a checkpoint step
    assert status != 0
    last = checkpoint.latest(bad)
    assert all(torch.isfinite(w).all() for w in weights(last).values()), f"{last.name} holds NaN weights"


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run checkpointed every 2 steps, shared by the fault tests below."""
    whole = tmp_path_factory.mktemp("straight") / "whole"
    assert cli.main(["pretrain", *TINY, "run.checkpoint_every=2", f"run.out={whole}"]) == 0
    return whole


@pytest.mark.slow  # 8 s; test-all (CI) runs it
def test_a_full_disk_at_a_checkpoint_exits_5_with_one_line_and_the_rerun_finishes(straight, tmp_path, capsys,
                                                                                  monkeypatch) -> None:
    """Issue 17: ENOSPC while writing step 4's checkpoint was a SafetensorError / torch traceback,
    exit 1 and a .tmp-step_* folder left behind. Now: one line (the folder, bytes needed and free),
    exit 5, the partial folder removed, step 2 intact; once space is freed the same command resumes
    and ends with the uninterrupted run's weights."""
    args = [*TINY, "run.checkpoint_every=2"]
    whole, full = straight, tmp_path / "full"
    real = checkpoint._write

    def write(path: Path, data: bytes) -> None:  # the disk fills halfway through step 4's state.pt
        if path.parent.name == ".tmp-step_00000004" and path.name == "state.pt":
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)
    monkeypatch.setattr(checkpoint, "_write", write)
    capsys.readouterr()
    assert cli.main(["pretrain", *args, f"run.out={full}"]) == cli.EXIT_DISK_FULL == 5
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    ckpt4 = re.escape(str(full / "checkpoints" / "step_00000004"))
    assert re.fullmatch(rf"error: disk full writing checkpoint {ckpt4}: "
                        r"it needs [0-9,]+ bytes, [0-9,]+ bytes free; the partial folder \.tmp-step_00000004 was "
                        r"removed and step_00000002 is intact\. Free some space and rerun the same command to resume",
                        lines[0]), lines[0]
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step_00000002"]
    assert checkpoint.latest(full).name == "step_00000002"

    monkeypatch.undo()  # space freed
    assert cli.main(["pretrain", *args, f"run.out={full}"]) == 0
    assert_same_weights(checkpoint.latest(whole), checkpoint.latest(full))
    assert steps_logged(full) == steps_logged(whole) == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow  # 7 s; test-all (CI) runs it
def test_a_torn_last_metrics_line_is_dropped_with_a_note_and_resume_ends_as_the_straight_run(straight, tmp_path,
                                                                                            capsys) -> None:
    """Issue 17: a kill while writing step 5's metrics line left half a JSON line after the step-4
    checkpoint; resuming crashed parsing it. It is dropped with one note, and the resumed file holds
    the uninterrupted run's records (images/s aside: a timing)."""
    args = [*TINY, "run.checkpoint_every=2"]
    whole, torn = straight, tmp_path / "torn"
    assert cli.main(["pretrain", *args, f"run.out={torn}"]) == 0
    shutil.rmtree(torn / "checkpoints" / "step_00000006")  # killed during step 5: the last checkpoint is step 4
    lines = (torn / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["step"] for ln in lines] == [1, 2, 3, 4, 5, 6]
    (torn / "metrics.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])
    capsys.readouterr()
    assert cli.main(["pretrain", *args, f"run.out={torn}"]) == 0
    err = capsys.readouterr().err
    assert f"note: {torn / 'metrics.jsonl'}: dropped line 5 that did not parse (torn by a kill during a write)" in err

    def records(run: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(ln).items() if k != "images_per_s"}
                for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert records(torn) == records(whole) and len(records(whole)) == 6
    assert_same_weights(checkpoint.latest(whole), checkpoint.latest(torn))


def test_a_full_disk_while_logging_metrics_is_one_line_too(tmp_path, monkeypatch) -> None:
    from bigmodel.errors import DiskFull
    from bigmodel.train.metrics import MetricsLog, read_metrics

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 1.0})

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(DiskFull) as e:
        log.write({"step": 2, "loss": 0.5})
    assert str(e.value) == (f"no space left to write {tmp_path / 'metrics.jsonl'} (No space left on device); free "
                            f"space on that disk and rerun the same command to resume from the last checkpoint")
    monkeypatch.undo()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
