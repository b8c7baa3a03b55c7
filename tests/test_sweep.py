"""``bigmodel sweep``: a grid of tiny runs, compared; a rerun trains nothing; a killed run is
finished from its checkpoint; bad grids are refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from bigmodel import api, cli
from bigmodel.commands.sweep import grid, run_name, split_values

TRANSFER = "transfer=[{task: digits, protocol: linear}]"
NAMES = ["optim.steps=4", "optim.steps=5", "optim.steps=6"]


def _files(out: Path, name: str) -> dict[str, bytes]:
    run = out / name
    return {p: (run / p).read_bytes() for p in ("metrics.jsonl", "report.json")}


@pytest.mark.slow  # four tiny runs with their transfer rows (10 s); `make test-all`
def test_sweep_runs_the_grid_compares_and_resumes(tmp_path) -> None:
    out = tmp_path / "sweep"
    args = ["run.tiny=true", "optim.steps=4,5,6", TRANSFER, "run.figures=false"]
    result = api.sweep("fractals-vit", args, out, Console(quiet=True))
    assert [r["name"] for r in result["runs"]] == NAMES
    assert [r["state"] for r in result["runs"]] == ["done"] * 3
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == NAMES
    saved = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in saved["rows"]] == NAMES
    assert [r["steps"] for r in saved["rows"]] == [4, 5, 6]
    assert saved["columns"] == ["digits · linear"]
    for row, name in zip(saved["rows"], NAMES, strict=True):
        report = json.loads((out / name / "report.json").read_text())
        assert report["recipe"]["optim"]["steps"] == int(name.split("=")[1])
        assert report["recipe"]["run"]["out"] == str(out / name)
        assert row["top1"]["digits · linear"] == report["transfer"][0]["results"]["pretrained"]["top1"]
    assert (out / "compare.html").is_file()
    assert json.loads((out / "sweep.json").read_text())["runs"] == result["runs"]
    before = {n: _files(out, n) for n in NAMES}

    # a rerun trains nothing: every run is skipped, no file of theirs changes
    again = api.sweep("fractals-vit", args, out, Console(quiet=True))
    assert [r["state"] for r in again["runs"]] == ["skipped"] * 3
    assert {n: _files(out, n) for n in NAMES} == before
    assert json.loads((out / "compare.json").read_text()) == saved

    # the middle run killed after its first checkpoint: no report, no last checkpoint
    middle = out / NAMES[1]
    (middle / "report.json").unlink()
    shutil.rmtree(middle / "checkpoints" / "step_00000005")
    assert sorted(p.name for p in (middle / "checkpoints").iterdir()) == ["step_00000003"]
    console = Console(record=True, width=200)
    resumed = api.sweep("fractals-vit", args, out, console)
    assert [r["state"] for r in resumed["runs"]] == ["skipped", "done", "skipped"]
    text = console.export_text()
    assert f"resuming from {middle / 'checkpoints' / 'step_00000003'} (step 3)" in text
    report = json.loads((middle / "report.json").read_text())
    assert report["pretrain"]["steps_done"] == 5
    first = json.loads(before[NAMES[1]]["report.json"])  # resuming reproduces the uninterrupted run
    assert report["curves"] == first["curves"]
    assert report["transfer"][0]["results"]["pretrained"] == first["transfer"][0]["results"]["pretrained"] | {
        "seconds": report["transfer"][0]["results"]["pretrained"]["seconds"]}
    assert sorted(p.name for p in (middle / "checkpoints").iterdir()) == ["step_00000003", "step_00000005"]
    for n in (NAMES[0], NAMES[2]):
        assert _files(out, n) == before[n]


def test_grid_and_names() -> None:
    assert split_values("1e-3,3e-3") == ["1e-3", "3e-3"]
    assert split_values("[0.9,0.95]") == ["[0.9,0.95]"]
    assert split_values("[0.9,0.95],[0.9,0.99]") == ["[0.9,0.95]", "[0.9,0.99]"]
    assert split_values("{name: npz, path: 'a,b.npz'},mnist") == ["{name: npz, path: 'a,b.npz'}", "mnist"]
    points, fixed = grid(["optim.lr=0.001,0.003", "run.tiny=true", "data.classes=8,16"])
    assert points == [["optim.lr=0.001", "data.classes=8"], ["optim.lr=0.001", "data.classes=16"],
                      ["optim.lr=0.003", "data.classes=8"], ["optim.lr=0.003", "data.classes=16"]]
    assert fixed == ["run.tiny=true"]
    assert run_name(points[1]) == "optim.lr=0.001,data.classes=16"
    assert run_name(["data.path=/d/x.npz", "optim.steps=2"]) == "data.path=_d_x.npz,optim.steps=2"


@pytest.mark.parametrize("args, message", [
    (["run.tiny=true"], "sweep: no axis to sweep; give at least one key=a,b[,c...]"),
    (["optim.steps=2,3", "run.out=x"], "sweep: run.out is set by the sweep (DIR/<overrides>); give --out DIR instead"),
    (["optim.steps=2,,3"], "sweep: 'optim.steps=2,,3' has an empty value"),
    (["optim.steps=2,2"], "sweep: 'optim.steps=2,2' repeats a value"),
    (["optim.steps=2,3", "optim.steps=4,5"], "sweep: a key is swept twice (optim.steps, optim.steps)"),
    (["optim.lr=0.001,-1"], "sweep run optim.lr=-1: optim.lr = -1: input should be greater than 0"),
])
def test_bad_grids_are_refused_before_any_run(tmp_path, capsys, args, message) -> None:
    out = tmp_path / "sweep"
    assert cli.main(["sweep", "fractals-vit", *args, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"recipe error: {message}\n"
    assert not out.exists()
