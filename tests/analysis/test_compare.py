"""``bigmodel compare``: the table read back exactly from the runs' report.json, the power-law fit
against its definition, the files written, and one clear line for a folder that is not a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from bigmodel import api, cli
from bigmodel.analysis import compare
from bigmodel.recipe import RecipeError, resolve

LINEAR, KNN = "digits · linear", "digits · knn"
TRANSFER = "transfer=[{task: digits, protocol: linear}, {task: digits, protocol: knn, k: 5}]"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[Path]:
    """Three runs, seed0..seed2 with 2, 3, 4 steps (linear and kNN on digits): seed0 a tiny quickstart
    run (a real report.json), the other two its copies whose report.json says 3 and 4 steps, other
    seeds and other accuracies (the table reads report.json only: training them teaches nothing more)."""
    root = tmp_path_factory.mktemp("runs")
    first = root / "seed0"
    api.run_pipeline(resolve("fractals-vit", ["run.tiny=true", "optim.steps=2", f"run.out={first}", TRANSFER,
                                   "run.figures=false"]), Console(quiet=True))
    dirs = [first]
    for seed, steps in ((1, 3), (2, 4)):
        out = root / f"seed{seed}"
        shutil.copytree(first, out)
        report = json.loads((out / "report.json").read_text())
        report["recipe"]["run"]["seed"], report["recipe"]["optim"]["steps"] = seed, steps
        report["pretrain"]["steps_done"] = steps
        for row in report["transfer"]:
            for who, result in row["results"].items():
                result["top1"] = round(result["top1"] - 3 * seed if who == "random_init" else result["top1"] + seed, 4)
        (out / "report.json").write_text(json.dumps(report))
        dirs.append(out)
    return dirs


def test_table_reads_each_report_exactly(runs, tmp_path) -> None:
    result = api.compare(runs, tmp_path / "cmp", Console(quiet=True))
    assert result["columns"] == [LINEAR, KNN]
    assert [r["label"] for r in result["rows"]] == ["seed0", "seed1", "seed2"]
    for row, run, steps in zip(result["rows"], runs, (2, 3, 4), strict=True):
        report = json.loads((run / "report.json").read_text())
        linear, knn = (r["results"] for r in report["transfer"])
        assert row["run"] == str(run)
        assert ((row["architecture"], row["size"], row["objective"], row["data"])
                == ("vit", "nano", "supervised", "fractals"))
        assert row["params"] == report["model"]["backbone_params"] == 455520
        assert row["steps"] == report["pretrain"]["steps_done"] == steps
        assert row["pretrain_gflops"] == report["model"]["train_gflops_per_step"] * steps
        assert row["top1"] == {LINEAR: linear["pretrained"]["top1"], KNN: knn["pretrained"]["top1"]}
        assert row["random_init_gap"] == {LINEAR: linear["pretrained"]["top1"] - linear["random_init"]["top1"],
                                          KNN: knn["pretrained"]["top1"] - knn["random_init"]["top1"]}
    assert result["fits"] == {"compute": {}, "params": {}}  # three runs: no fit
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved == json.loads(json.dumps(result))
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3  # bars, against compute, against parameters
    assert "No fit" in page
    assert sorted(p.name for p in (tmp_path / "cmp").glob("*.png")) == [
        "compare-accuracy-against-parameters.png", "compare-accuracy-against-pretraining-compute.png",
        "compare-accuracy-per-protocol.png"]


def test_transfer_files_add_columns_the_report_lacks(runs, tmp_path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    report = json.loads((run / "report.json").read_text())
    row = {**report["transfer"][0], "task": "mnist", "results": {"pretrained": {"top1": 12.5}}}
    same = {**report["transfer"][0], "results": {"pretrained": {"top1": 1.0}}}  # the report's row wins
    (run / "transfer").mkdir(exist_ok=True)
    (run / "transfer" / "custom-abc.json").write_text(json.dumps({"provenance": {}, "transfer": [row, same]}))
    (run / "transfer" / "partial.json").write_text("{}")  # a stopped suite's rows: left out
    got = compare.read_run(run)
    assert got["top1"] == {LINEAR: report["transfer"][0]["results"]["pretrained"]["top1"],
                           KNN: report["transfer"][1]["results"]["pretrained"]["top1"], "mnist · linear": 12.5}
    assert "mnist · linear" not in got["random_init_gap"]


def test_power_law_recovers_its_parameters() -> None:
    x = np.array([3.0, 30.0, 250.0, 4e3, 7e4])
    fit = compare.power_law(x, 42.0 * x ** -0.37)
    assert fit["a"] == pytest.approx(42.0, abs=1e-9, rel=0)
    assert fit["b"] == pytest.approx(0.37, abs=1e-9, rel=0)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["n"] == 5
    # a noisy line: the least-squares slope and intercept of log error on log x
    lx, ly = np.log(x), np.log([20.0, 11.0, 9.0, 4.0, 3.5])
    slope, intercept = np.polyfit(lx, ly, 1)
    fit = compare.power_law(x, np.exp(ly))
    assert (fit["a"], fit["b"]) == (pytest.approx(np.exp(intercept), rel=1e-12), pytest.approx(-slope, rel=1e-12))


def _fake_run(folder: Path, gflops_per_step: float, steps: int, params: int, top1: float) -> Path:
    folder.mkdir(parents=True)
    row = {"task": "digits", "task_settings": {}, "protocol": "linear", "settings": {},
           "results": {"pretrained": {"top1": top1}}}
    (folder / "report.json").write_text(json.dumps({
        "recipe": {"architecture": {"name": "vit", "size": "nano"}, "objective": {"name": "mae"},
                   "data": {"name": "npz", "path": "/data/cifar10.npz"}},
        "pretrain": {"steps_done": steps},
        "model": {"backbone_params": params, "train_gflops_per_step": gflops_per_step},
        "transfer": [row]}))
    return folder


def test_fit_over_four_runs_is_drawn_and_saved(tmp_path) -> None:
    a, b, steps = 80.0, 0.2, [10, 40, 160, 640]
    runs = [_fake_run(tmp_path / f"r{s}", 0.5, s, 1000 * s, 100 - a * (0.5 * s) ** -b) for s in steps]
    result = compare.compare(runs)
    fit = result["fits"]["compute"][LINEAR]
    assert (fit["a"], fit["b"], fit["n"]) == (pytest.approx(a, abs=1e-9, rel=0), pytest.approx(b, abs=1e-9, rel=0), 4)
    fit = result["fits"]["params"][LINEAR]  # accuracy = 100 - 80·(s/2)^-0.2 = 100 - 80·2000^0.2·P^-0.2
    assert (fit["a"], fit["b"]) == (pytest.approx(a * 2000 ** b, rel=1e-12), pytest.approx(b, abs=1e-9, rel=0))
    assert [r["data"] for r in result["rows"]] == ["cifar10"] * 4
    compare.write(result, tmp_path / "out")
    page = (tmp_path / "out" / "compare.html").read_text()
    assert "No fit" not in page and f"<td>{a:.4g}</td><td>{b:.4g}</td>" in page
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["fits"]["compute"][LINEAR]["n"] == 4


def test_a_folder_without_report_is_one_clear_line(runs, tmp_path, capsys) -> None:
    with pytest.raises(RecipeError, match=f"^{tmp_path}: no report.json there"):
        compare.compare([runs[0], tmp_path])
    assert cli.main(["compare", str(runs[0]), str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err == f"recipe error: {tmp_path}: no report.json there (not a finished bigmodel run directory)\n"
    assert not (tmp_path / "o").exists()


def _synthetic_run(folder: Path, rows: list[tuple[dict, float]]) -> Path:
    """A run directory holding only a report.json with kNN rows of the given settings and top-1."""
    folder.mkdir(parents=True)
    transfer = [{"task": "digits", "task_settings": {}, "protocol": "knn", "settings": settings, "n_train": 1,
                 "n_test": 1, "results": {"pretrained": {"top1": top1}}} for settings, top1 in rows]
    report = {"recipe": {"architecture": {"name": "vit"}, "objective": {"name": "mae"}, "data": {"name": "fractals"}},
              "model": {"backbone_params": 10, "train_gflops_per_step": 1.0}, "pretrain": {"steps_done": 5},
              "transfer": transfer}
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_columns_are_distinct_settings_labelled_by_what_differs(tmp_path) -> None:
    """Issue 17: kNN at k=20 and k=200 shared the column ``digits · knn`` and one silently won."""
    k20, k200 = {"k": 20, "temperature": 0.07}, {"k": 200, "temperature": 0.07}
    a = _synthetic_run(tmp_path / "a", [(k20, 61.0), (k200, 55.5)])
    b = _synthetic_run(tmp_path / "b", [(k200, 70.25)])
    c = _synthetic_run(tmp_path / "c", [(k20, 40.0)])
    result = compare.compare([a, b, c])
    assert result["columns"] == ["digits · knn (k=20)", "digits · knn (k=200)"]
    assert [r["top1"] for r in result["rows"]] == [
        {"digits · knn (k=20)": 61.0, "digits · knn (k=200)": 55.5}, {"digits · knn (k=200)": 70.25},
        {"digits · knn (k=20)": 40.0}]
    # one setting per task · protocol across the runs: the plain label, as before
    assert compare.compare([c])["columns"] == ["digits · knn"]
    assert compare.read_run(a)["top1"] == {"digits · knn (k=20)": 61.0, "digits · knn (k=200)": 55.5}
