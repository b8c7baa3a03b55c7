"""Suites: built-in suites validate, --set adjusts the right entries, and a suite over digits and
MNIST runs end to end on a tiny checkpoint with its provenance in report.json."""

from __future__ import annotations

import json

import pytest
import yaml

from bigmodel import api, cli
from bigmodel.recipe import RecipeError
from bigmodel.transfer import suites


@pytest.mark.parametrize("name", suites.suite_names())
def test_builtin_suites_validate(name, monkeypatch):
    monkeypatch.setenv(suites.SHARED_DATA_VAR, "/data")
    specs = suites.specs(suites.load_suite(name))
    assert {s.protocol.name for s in specs} >= {"linear", "knn", "fewshot"}
    for s in specs:
        assert "$" not in str(s.task.kwargs)
        if s.task.name == "npz":
            assert s.task.kwargs["path"].startswith("/data/")


def test_sets_apply_where_the_key_exists():
    entries = [{"task": "digits", "protocol": "linear"},
               {"task": {"name": "npz", "path": "m.npz"}, "protocol": "finetune"},
               {"task": {"name": "npz", "path": "m.npz"}, "protocol": "fewshot"}]
    out = suites.apply_sets(entries, ["steps=7", "task.limit=100", "2.seeds=2", "C=0.5"])
    assert out[1]["steps"] == 7 and "steps" not in out[0] and "steps" not in out[2]
    assert "limit" not in out[0]["task"] and out[1]["task"]["limit"] == out[2]["task"]["limit"] == 100
    assert out[2]["seeds"] == 2 and out[0]["C"] == out[2]["C"] == 0.5
    assert entries[1] == {"task": {"name": "npz", "path": "m.npz"}, "protocol": "finetune"}  # not mutated
    with pytest.raises(RecipeError, match="no protocol of these entries has a key 'kk'"):
        suites.apply_sets(entries, ["kk=1"])
    with pytest.raises(RecipeError, match="unknown key"):
        suites.specs(entries, ["0.kk=1"])


def test_unknown_suite_lists_the_builtin_ones():
    with pytest.raises(RecipeError, match="digits"):
        suites.load_suite("nope")


def test_suite_over_digits_and_mnist_end_to_end(tiny_run, mnist_npz, tmp_path):
    suite = tmp_path / "tiny.yaml"
    mnist = {"name": "npz", "path": str(mnist_npz), "limit": 300}
    suite.write_text(yaml.safe_dump({"transfer": [
        {"task": "digits", "protocol": "knn", "k": 5},
        {"task": "digits", "protocol": "fewshot", "shots": [1, 3], "seeds": 2},
        {"task": mnist, "protocol": "linear", "max_iter": 300},
        {"task": mnist, "protocol": "fewshot", "shots": [1], "seeds": 2},
        {"task": mnist, "protocol": "finetune", "steps": 4, "batch_size": 16, "flip": False},
    ]}))
    rows = api.transfer(tiny_run, suite=str(suite), sets=["task.limit=200"])
    report = json.loads((tiny_run / "transfer" / "tiny.json").read_text())
    assert [r["protocol"] for r in report["transfer"]] == ["knn", "fewshot", "linear", "fewshot", "finetune"]
    assert [r["results"]["pretrained"]["top1"] for r in report["transfer"]] == \
        pytest.approx([r["results"]["pretrained"]["top1"] for r in rows])
    prov = report["provenance"]
    assert prov["step"] == 6 and prov["checkpoint"].endswith("step_00000006")
    assert {"torch", "bigmodel", "scikit-learn", "timm"} <= set(prov["versions"])
    assert prov["sets"] == ["task.limit=200"] and prov["architecture"]["image_size"] == 16
    mnist_rows = report["transfer"][2:]
    assert all(r["n_train"] == r["n_test"] == 200 and r["task_settings"]["limit"] == 200 for r in mnist_rows)
    assert report["transfer"][1]["settings"]["seeds"] == [0, 1]
    assert set(report["transfer"][1]["results"]["pretrained"]["per_shot"]) == {"1", "3"}
    finetune = report["transfer"][4]
    assert finetune["settings"]["steps"] == 4
    assert finetune["results"]["pretrained"]["schedule"]["steps"] == 4
    assert finetune["results"]["pretrained"]["schedule"]["resize"] == 20  # 16 · 160/128


def test_cli_task_protocol_with_sets_and_the_run_report(tiny_run, capsys):
    code = cli.main(["transfer", str(tiny_run), "--task", "digits", "--protocol", "fewshot",
                     "--set", "shots=[2]", "--set", "seeds=2", "--json"])
    assert code == 0
    assert '"shots": [' in capsys.readouterr().out  # --json
    saved = json.loads((tiny_run / "transfer" / "digits-fewshot.json").read_text())
    assert saved["transfer"][0]["settings"]["shots"] == [2]
    assert saved["transfer"][0]["results"]["pretrained"]["primary_shots"] == 2
    assert cli.main(["transfer", str(tiny_run), "--suite", "digits", "--set", "nokey=1"]) == 2
    run_report = json.loads((tiny_run / "report.json").read_text())
    assert run_report["transfer"][0]["protocol"] == "knn"
    assert run_report["transfer_provenance"]["step"] == 6
    assert "torch" in run_report["transfer_provenance"]["versions"]
