"""Run directories and checkpoints (issue 8): non-finite settings, a run.out that is a file or not
writable, a run directory locked by another process, a different recipe, damaged checkpoints.
Nothing a user trained is lost: every refusal leaves the run directory as it was."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
import yaml

from bigmodel.cli import main
from bigmodel.train import checkpoint
from bigmodel.train.run_dir import LOCK
from tests.bad_input.case import Case, check, params

_CACHE: dict[str, Path] = {}
TINY = ["fractals-vit", "run.tiny=true", "architecture.image_size=16", "data.image_size=16"]
HOST = socket.gethostname()


def _with_run(tmp: Path) -> None:
    """``tmp/run``: a tiny pretrained quick-start run, checkpoints at steps 3 and 6 (trained once
    per session, then copied)."""
    if "run" not in _CACHE:
        out = Path(tempfile.mkdtemp(prefix="bigmodel-rundirs-")) / "run"
        assert main(["pretrain", *TINY, f"run.out={out}"]) == 0
        _CACHE["run"] = out
    shutil.copytree(_CACHE["run"], tmp / "run")


def _snapshot(tmp: Path, ignore: tuple[str, ...]) -> dict[str, bytes]:
    files = sorted(p for p in (tmp / "run").rglob("*") if p.is_file())
    return {str(p.relative_to(tmp)): p.read_bytes() for p in files if str(p.relative_to(tmp)) not in ignore}


def _unchanged(setup, ignore: tuple[str, ...] = ()):
    """``setup`` followed by a snapshot of ``tmp/run``; the check asserts every byte is as it was
    (but for the files in ``ignore``)."""
    before: dict[str, bytes] = {}

    def prepare(tmp: Path) -> None:
        setup(tmp)
        before.clear()
        before.update(_snapshot(tmp, ignore))

    def unchanged(tmp: Path) -> None:
        assert _snapshot(tmp, ignore) == before

    return prepare, unchanged


def _locked_by(pid: int, host: str):
    def setup(tmp: Path) -> None:
        _with_run(tmp)
        (tmp / "run" / LOCK).write_text(json.dumps({"pid": pid, "host": host}))
    return _unchanged(setup)


def _damaged(*steps: int, same_size: bool = True):
    def setup(tmp: Path) -> None:
        _with_run(tmp)
        for step in steps:
            path = tmp / "run" / "checkpoints" / f"step_{step:08d}" / "model.safetensors"
            path.write_bytes(bytes(path.stat().st_size) if same_size else b"trunc")
    return setup


def _a_file(tmp: Path) -> None:
    (tmp / "afile").write_text("not a folder\n")


def _refreshed_step_6(tmp: Path) -> None:
    last = checkpoint.latest(tmp / "run", warn=pytest.fail)
    assert last.name == "step_00000006" and checkpoint.problem(last) is None


DIFFERENT = _unchanged(_with_run)
LIVE, ELSEWHERE = _locked_by(os.getpid(), HOST), _locked_by(1, "another-host")
# --resume saves recipe.yaml (its run.out set to where the folder is now) before the trainer looks
# at the checkpoints: that file may change, no other.
DAMAGED_ALL = _unchanged(_damaged(3, 6), ignore=("run/recipe.yaml",))

CASES = [
    Case("lr-inf", ["run", *TINY, "optim.lr=inf", "run.out={tmp}/r"], 2,
         "optim.lr = 'inf': input should be a finite number", absent=("r",)),
    Case("lr-nan", ["run", *TINY, "optim.lr=nan", "run.out={tmp}/r"], 2,
         "optim.lr = 'nan': input should be a finite number", absent=("r",)),
    Case("weight-decay-yaml-nan", ["run", *TINY, "optim.weight_decay=.nan", "run.out={tmp}/r"], 2,
         "optim.weight_decay = nan: input should be a finite number", absent=("r",)),
    Case("grad-clip-inf", ["run", *TINY, "optim.grad_clip=.inf", "run.out={tmp}/r"], 2,
         "optim.grad_clip = inf: input should be a finite number", absent=("r",)),
    Case("beta-above-1", ["run", *TINY, "optim.betas=[0.9,1.5]", "run.out={tmp}/r"], 2,
         "optim.betas.1 = 1.5: input should be less than 1", absent=("r",)),
    Case("out-is-a-file", ["pretrain", *TINY, "run.out={tmp}/afile"], 2,
         "is a file, not a folder; choose another run.out", setup=_a_file,
         check=lambda tmp: (tmp / "afile").read_text() == "not a folder\n" or pytest.fail("afile changed")),
    Case("out-under-a-file", ["pretrain", *TINY, "run.out={tmp}/afile/sub"], 2,
         "cannot be created (Not a directory); choose a run.out in a folder you can write", setup=_a_file),
    Case("locked-by-a-live-process", ["pretrain", *TINY, "run.out={tmp}/run"], 2,
         f"run' is in use by process {os.getpid()} on {HOST} (lock ", setup=LIVE[0], check=LIVE[1]),
    Case("locked-on-another-host", ["pretrain", "--resume", "{tmp}/run"], 2,
         "is in use by process 1 on another-host", setup=ELSEWHERE[0], check=ELSEWHERE[1]),
    Case("different-recipe", ["pretrain", *TINY, "optim.lr=0.5", "run.out={tmp}/run"], 2,
         "holds a run of a different recipe (sections differ: optim); choose another run.out or --resume",
         setup=DIFFERENT[0], check=DIFFERENT[1]),
    Case("no-intact-checkpoint-resume", ["pretrain", "--resume", "{tmp}/run"], 2,
         "step_00000006: model.safetensors fails its sha256 check (and 1 older, all damaged); no intact "
         "checkpoint to load. Nothing was deleted", setup=DAMAGED_ALL[0], check=DAMAGED_ALL[1]),
    Case("no-intact-checkpoint-transfer", ["transfer", "{tmp}/run", "--task", "digits", "--protocol", "knn"], 2,
         "no intact checkpoint to load", setup=DAMAGED_ALL[0], check=DAMAGED_ALL[1]),
    Case("damaged-latest-resumes-from-the-one-before", ["pretrain", "--resume", "{tmp}/run"], 0,
         "step_00000006: model.safetensors has 5 bytes, ", setup=_damaged(6, same_size=False),
         check=_refreshed_step_6),
    Case("resume-a-folder-that-is-no-run", ["pretrain", "--resume", "{tmp}"], 2,
         "no recipe.yaml there; is it a bigmodel run directory?"),
    Case("resume-with-overrides", ["pretrain", "--resume", "{tmp}/run", "optim.lr=1"], 2,
         "--resume continues a run exactly as it was: give no recipe or overrides with it"),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, capsys, monkeypatch) -> None:
    check(case, tmp_path, capsys, monkeypatch)


def test_unwritable_out(tmp_path, capsys, monkeypatch) -> None:
    """Tests run as root, who may write anywhere: ``os.access`` is made to say no for the run
    folder, so this covers the check and its message, not the kernel's refusal."""
    real = os.access
    target = tmp_path / "ro"
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == target else real(p, mode, **kw))
    case = Case("out-unwritable", ["pretrain", *TINY, "run.out={tmp}/ro"], 2,
                f"run.out='{target}' is not writable; choose a run.out in a folder you can write",
                setup=lambda tmp: target.mkdir(),
                check=lambda tmp: list(target.iterdir()) == [] or pytest.fail("wrote into it"))
    check(case, tmp_path, capsys, monkeypatch)


def test_the_damaged_checkpoint_is_named_in_a_warning(tmp_path, capsys, monkeypatch) -> None:
    err = check(CASES[-3], tmp_path, capsys, monkeypatch)
    assert f"warning: checkpoint {tmp_path}/run/checkpoints/step_00000006: model.safetensors has 5 bytes, " in err
    assert "were written; using step_00000003 instead" in err
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["run"]["out"] == f"{tmp_path}/run"
