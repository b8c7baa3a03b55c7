"""Exact resume: a run killed with SIGKILL mid-training and resumed ends bit-identical to an
uninterrupted run; a half-written checkpoint is never loaded."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from bigmodel.cli import main
from bigmodel.train import checkpoint
from tests.helpers import REPO, cli, env

ARGS = ["quickstart", "run.tiny=true", "optim.steps=16", "run.checkpoint_every=2", "run.log_every=1",
        "optim.accum_steps=2"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    last = checkpoint.latest(run_dir)
    assert last is not None and last.name == "step_00000016"
    return load_file(str(last / "model.safetensors"))


def test_sigkill_then_resume_is_bit_exact(tmp_path) -> None:
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    proc = cli("pretrain", *ARGS, f"run.out={whole}")
    assert proc.returncode == 0, proc.stderr

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

    proc = cli("pretrain", *ARGS, f"run.out={killed}")  # same command: resumes automatically
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stdout
    a, b = final_weights(whole), final_weights(killed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # no duplicated or missing log lines across the kill


def test_resume_flag_and_different_recipe_refused(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["pretrain", "quickstart", "run.tiny=true", f"run.out={out}"]) == 0
    assert main(["pretrain", "quickstart", "run.tiny=true", "optim.lr=0.5", f"run.out={out}"]) == 2
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
