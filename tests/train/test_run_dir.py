"""Run directories never lose work: one identity per folder (however it is named), a lock against
two trainers, a failed run's folder reusable, and a transfer stopped by SIGTERM resumed row by row."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from bigmodel.cli import EXIT_DIVERGED, EXIT_OK, EXIT_STOPPED, main
from bigmodel.commands import run as run_command
from bigmodel.recipe import RecipeError, load_raw
from bigmodel.train.run_dir import LOCK, RunLock
from tests.helpers import REPO, cli, env

TINY = ["fractals-vit", "run.tiny=true", "run.figures=false"]  # figures have tests of their own


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.slow  # six pretrain commands; `make test-all`
def test_resume_by_any_path_to_the_same_folder(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", *TINY, "run.out=runs/pt"]) == EXIT_OK
    (tmp_path / "elsewhere").mkdir()
    for cwd, arg in ((tmp_path, "./runs/pt"), (tmp_path, str(tmp_path / "runs" / "pt")),
                     (tmp_path / "elsewhere", "../runs/pt")):
        monkeypatch.chdir(cwd)
        capsys.readouterr()
        assert main(["pretrain", "--resume", arg]) == EXIT_OK, capsys.readouterr().err
        assert "resuming from" in capsys.readouterr().out
    (tmp_path / "runs" / "pt").rename(tmp_path / "moved")
    assert main(["pretrain", "--resume", str(tmp_path / "moved")]) == EXIT_OK
    assert "(step 6)" in capsys.readouterr().out
    # the same command, run.out spelled another way, is the same run too
    assert main(["pretrain", *TINY, f"run.out={tmp_path}/./moved"]) == EXIT_OK
    assert "resuming from" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "moved" / "recipe.yaml").read_text())["run"]["out"] == f"{tmp_path}/./moved"


def test_a_failed_run_without_checkpoint_is_taken_over_by_the_corrected_command(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    bad = ["pretrain", *TINY, "optim.lr=1e30", "optim.grad_clip=null", "run.out=runs/q"]
    assert main(bad) == EXIT_DIVERGED
    assert capsys.readouterr().err.startswith("error: loss became nan at step ")
    assert (tmp_path / "runs/q/recipe.yaml").exists() and not (tmp_path / "runs/q/checkpoints").exists()
    assert not (tmp_path / "runs/q" / LOCK).exists()  # released on the error too
    assert main(["pretrain", *TINY, "run.out=runs/q"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "run.out runs/q held no checkpoint: starting afresh with this recipe" in out
    assert yaml.safe_load((tmp_path / "runs/q/recipe.yaml").read_text())["optim"]["lr"] == 2e-3


def test_the_lock_is_held_while_training_and_released_after(tmp_path, monkeypatch) -> None:
    seen = []
    real = run_command.pretrain

    def spy(recipe, run_dir, *args):
        seen.append(json.loads((run_dir / LOCK).read_text()))
        return real(recipe, run_dir, *args)

    monkeypatch.setattr(run_command, "pretrain", spy)
    assert main(["pretrain", *TINY, f"run.out={tmp_path}/r"]) == EXIT_OK
    assert [(s["pid"], s["host"]) for s in seen] == [(os.getpid(), socket.gethostname())]
    assert not (tmp_path / "r" / LOCK).exists()


def test_a_second_lock_in_the_same_process_is_refused(tmp_path) -> None:
    with RunLock(tmp_path):
        with pytest.raises(RecipeError, match=f"in use by process {os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path).__enter__()
        assert (tmp_path / LOCK).exists()
    assert not (tmp_path / LOCK).exists()


def test_only_rank_0_locks_and_writes(tmp_path, monkeypatch) -> None:
    from bigmodel.recipe import resolve
    from bigmodel.train.run_dir import open_run

    recipe = resolve("fractals-vit", ["run.tiny=true", f"run.out={tmp_path}/r"])
    monkeypatch.setenv("RANK", "1")
    with open_run(recipe) as run_dir:
        assert run_dir == tmp_path / "r" and not run_dir.exists()
    monkeypatch.setenv("RANK", "0")
    with open_run(recipe) as run_dir:
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK, "recipe.yaml"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["recipe.yaml"]


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys) -> None:
    pid = dead_pid()
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / LOCK).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    assert main(["pretrain", *TINY, f"run.out={tmp_path}/r"]) == EXIT_OK
    note = (f"note: took over {tmp_path}/r/{LOCK}: the lock of process {pid} on {socket.gethostname()}, "
            f"which is no longer running")
    assert note in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "r" / LOCK).exists()


ROWS = [  # row 1 and 2 fine-tune (seconds each): long enough to send SIGTERM while one runs
    {"task": "digits", "protocol": "linear"},
    {"task": "digits", "protocol": "finetune", "steps": 40, "batch_size": 32},
    {"task": "digits", "protocol": "finetune", "steps": 41, "batch_size": 32},
    {"task": "digits", "protocol": "knn", "k": 5},
]


@pytest.mark.slow  # a subprocess stopped by a signal, then resumed; `make test-all`
def test_sigterm_during_transfer_saves_the_rows_done_and_the_rerun_finishes_the_rest(tmp_path) -> None:
    raw = load_raw("fractals-vit")
    raw["transfer"] = ROWS
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    run_dir, partial = tmp_path / "run", tmp_path / "run" / "transfer" / "partial.json"
    argv = [sys.executable, "-m", "bigmodel", "run", str(recipe), "run.tiny=true", f"run.out={run_dir}"]
    p = subprocess.Popen(argv, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not partial.exists():  # the first row is scored: the transfer phase is under way
        assert p.poll() is None, f"the run ended before it could be stopped: {p.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=240)
    assert p.returncode == EXIT_STOPPED, err[-2000:]
    done = json.loads(partial.read_text())["transfer"]
    n = len(done)
    assert 1 <= n < len(ROWS)
    assert f"stopped during transfer after {n} of {len(ROWS)} rows; rerun the same command to finish" in err
    assert not (run_dir / "report.json").exists()

    again = cli(*argv[3:])
    assert again.returncode == EXIT_OK, again.stderr[-2000:]
    assert "resuming from" in again.stdout and "step 1/" not in again.stdout  # pretraining was done
    assert f"transfer: {n} of {len(ROWS)} rows already scored" in " ".join(again.stdout.split())
    assert again.stdout.count(" · pretrained: top-1") == len(ROWS) - n  # only the missing rows ran
    rows = json.loads((run_dir / "report.json").read_text())["transfer"]
    assert [(r["protocol"], r["settings"].get("steps")) for r in rows] == [
        ("linear", None), ("finetune", 40), ("finetune", 41), ("knn", None)]
    assert rows[:n] == done  # taken as saved (timings included), not recomputed
    assert not partial.exists()


def test_a_full_disk_while_saving_the_recipe_is_one_line_and_keeps_the_old_one(tmp_path, monkeypatch) -> None:
    from pathlib import Path

    from bigmodel.errors import DiskFull
    from bigmodel.recipe import resolve
    from bigmodel.train import run_dir as run_dir_mod

    recipe = resolve("fractals-vit", ["run.tiny=true", f"run.out={tmp_path}/r"])
    run_dir_mod.save_recipe(writable := run_dir_mod.writable_folder(tmp_path / "r"), recipe)
    before = (writable / "recipe.yaml").read_text()
    real = Path.write_text

    def full(self, data, *args, **kwargs):
        if self.name == "recipe.yaml.tmp":
            real(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data, *args, **kwargs)
    monkeypatch.setattr(Path, "write_text", full)
    monkeypatch.setattr(run_dir_mod.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 512, 512))
    with pytest.raises(DiskFull) as e:
        run_dir_mod.save_recipe(writable, recipe)
    assert str(e.value) == (f"no space left to write {writable / 'recipe.yaml'} (No space left on device, 512 bytes "
                            f"free); free some space and rerun the same command")
    assert sorted(p.name for p in writable.iterdir()) == ["recipe.yaml"]
    assert (writable / "recipe.yaml").read_text() == before
