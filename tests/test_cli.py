"""The main job end to end through the CLI, in a subprocess, at tiny size."""

from __future__ import annotations

import json

import yaml

from bigmodel.cli import main
from tests.helpers import cli


def test_tiny_run_end_to_end(tmp_path) -> None:
    out = tmp_path / "run"
    proc = cli("run", "quickstart", "run.tiny=true", f"run.out={out}")
    assert proc.returncode == 0, proc.stderr
    assert "transfer (top-1 %, test split)" in proc.stdout and "report:" in proc.stdout
    for name in ("recipe.yaml", "metrics.jsonl", "report.json", "report.html"):
        assert (out / name).is_file(), name
    assert yaml.safe_load((out / "recipe.yaml").read_text())["run"]["out"] == str(out)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts[-1] == "step_00000006"
    assert {"model.safetensors", "state.pt", "meta.json"} <= {p.name for p in (out / "checkpoints" / ckpts[-1]).iterdir()}
    report = json.loads((out / "report.json").read_text())
    rows = report["transfer"]
    assert [(r["task"], r["protocol"]) for r in rows] == [("digits", "linear"), ("digits", "knn")]
    for r in rows:
        assert set(r["results"]) == {"pretrained", "random_init", "pixels"}
        assert all(0 <= v["top1"] <= 100 for v in r["results"].values())
        assert r["n_train"] + r["n_test"] == 1797
    # raw-pixel logistic regression on digits: the documented reference figure (~96.9%)
    assert abs(rows[0]["results"]["pixels"]["top1"] - 96.9) < 1.0
    assert report["model"]["backbone_params"] > 0 and report["model"]["forward_gflops_per_image"] > 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 6 and "loss" in metrics[-1] and "images_per_s" in metrics[-1]


# The commands below run in-process through the CLI's entry point: a subprocess each would only
# add interpreter start-up; test_tiny_run_end_to_end covers the real subprocess.


def test_transfer_command_on_a_checkpoint(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    assert main(["pretrain", "quickstart", "run.tiny=true", f"run.out={out}"]) == 0
    capsys.readouterr()
    assert main(["transfer", str(out), "--task", "digits", "--protocol", "knn", "--json"]) == 0
    stdout = capsys.readouterr().out
    rows = json.loads(stdout[stdout.index("[\n"):])
    assert rows[0]["protocol"] == "knn" and "pretrained" in rows[0]["results"]


def test_zoo_and_components_list(capsys) -> None:
    assert main(["zoo"]) == 0
    assert "quickstart" in capsys.readouterr().out
    assert main(["components"]) == 0
    stdout = capsys.readouterr().out
    for name in ("vit", "resnet", "lstm", "igpt", "fractals", "digits", "npz", "supervised", "simclr", "mae",
                 "autoregressive", "linear", "knn", "finetune", "fewshot", "architecture × objective"):
        assert name in stdout, name
