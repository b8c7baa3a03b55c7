"""Suites: built-in suites validate, --set adjusts the right entries, and a suite over digits and
MNIST runs end to end on a tiny checkpoint with its provenance in report.json."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from bigmodel import api, cli
from bigmodel.recipe import RecipeError
from bigmodel.transfer import suites
from bigmodel.transfer.finetune import FAMILY_DEFAULTS


@pytest.mark.parametrize("name", suites.suite_names())
def test_builtin_suites_validate(name):
    specs = suites.specs(suites.load_suite(name))
    assert {s.protocol.name for s in specs} >= {"linear", "knn", "fewshot"}
    for s in specs:
        if s.task.name == "npz":  # kept as written: found in the data folders when the task is built
            assert s.task.kwargs["path"] == f"$BIGMODEL_DATA/{name}.npz"
        else:
            assert "$" not in str(s.task.kwargs)


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
    rows = api.score_checkpoint(tiny_run, suite=str(suite), sets=["task.limit=200"])
    report = json.loads(_one(tiny_run, "tiny-*.json").read_text())
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
    assert finetune["results"]["pretrained"]["schedule"]["resize"] == 16  # a ViT trains on the whole image
    assert finetune["results"]["pretrained"]["optimizer"] == {"family": "transformer", **FAMILY_DEFAULTS["transformer"],
                                                              "batch_size": 16, "generative_weight": 0.0}  # the suite's


def _one(run, pattern):
    files = sorted((run / "transfer").glob(pattern))
    assert len(files) == 1, files
    return files[0]


def test_cli_task_protocol_with_sets_and_the_run_report(tiny_run, capsys):
    code = cli.main(["transfer", str(tiny_run), "--task", "digits", "--protocol", "fewshot",
                     "--set", "shots=[2]", "--set", "seeds=2", "--json"])
    assert code == 0
    assert '"shots": [' in capsys.readouterr().out  # --json
    saved = json.loads(_one(tiny_run, "digits-fewshot-*.json").read_text())
    assert saved["transfer"][0]["settings"]["shots"] == [2]
    assert saved["transfer"][0]["results"]["pretrained"]["primary_shots"] == 2
    assert cli.main(["transfer", str(tiny_run), "--suite", "digits", "--set", "nokey=1"]) == 2
    run_report = json.loads((tiny_run / "report.json").read_text())
    assert run_report["transfer"][0]["protocol"] == "knn"
    assert run_report["transfer_provenance"]["step"] == 6
    assert "torch" in run_report["transfer_provenance"]["versions"]


def test_transfers_with_other_settings_keep_their_own_files(tiny_run, capsys):
    """Two --set values: two files, each with its settings; the same settings again: the same file."""
    for k in (3, 5, 3):
        assert cli.main(["transfer", str(tiny_run), "--task", "digits", "--protocol", "knn", "--set", f"k={k}"]) == 0
    files = sorted((tiny_run / "transfer").glob("digits-knn-*.json"))
    settings = [json.loads(f.read_text())["transfer"][0]["settings"] for f in files]
    assert sorted(s["k"] for s in settings) == [3, 5]
    specs = {k: suites.specs([{"task": "digits", "protocol": "knn", "k": k}]) for k in (3, 5)}
    assert sorted(f.name for f in files) == sorted(f"digits-knn-{suites.settings_id(s)}.json" for s in specs.values())
    out = capsys.readouterr().out
    assert "transfer 1/1: digits · knn (1347 train / 450 test images)" in out
    assert out.count("  features digits/train · pretrained: 1347/1347 images") == 3


def test_settings_id_covers_defaults_and_values():
    def sid(**kw):
        return suites.settings_id(suites.specs([{"task": "digits", "protocol": "knn", **kw}]))

    assert sid() == sid(k=20)  # k=20 is knn's default: the same settings, the same file
    assert sid(k=5) != sid(k=20) and sid(k=5) == sid(k=5)
    half = {"task": {"name": "digits", "test_fraction": 0.5}, "protocol": "knn"}
    assert suites.settings_id(suites.specs([half])) != sid()


@pytest.mark.parametrize("entry, sets, line", [
    ({"task": "digits", "protocol": "knn"}, ["k=100000"],
     "transfer.0 (digits · knn): k = 100000 is more than the 1347 training images; use k <= 1347"),
    ({"task": "digits", "protocol": "fewshot"}, ["shots=[1, 500]"],
     "transfer.0 (digits · fewshot): shots = [1, 500]: 500 shots per class, but class 8 has only 131 "
     "training images; use shots <= 131"),
    ({"task": {"name": "digits", "test_fraction": 0.98}, "protocol": "knn", "k": 36}, [],
     "transfer.0 (digits · knn): k = 36 is more than the 35 training images; use k <= 35"),
])
def test_impossible_settings_are_refused_before_any_work(entry, sets, line):
    with pytest.raises(RecipeError) as err:
        suites.check(suites.specs([entry], sets))
    assert str(err.value) == line


def test_feature_progress_line(tiny_mlp, monkeypatch):
    """Off a terminal: one line every `every` seconds and one at the end, with exact counts and rates."""
    import io

    from rich.console import Console

    from bigmodel.data.base import TensorImages
    from bigmodel.transfer import base

    data = TensorImages(torch.randint(0, 255, (140, 1, 8, 8), dtype=torch.uint8), torch.arange(140) % 2)
    net = tiny_mlp()
    silent = base.features(net, data, batch_size=40)
    ticks = iter([0.0, 1.0, 16.0, 17.0, 20.0])  # start, then one reading per batch of 40
    monkeypatch.setattr(base, "_clock", lambda: next(ticks))
    console = Console(file=io.StringIO(), width=200)
    got = base.features(net, data, batch_size=40, console=console, label="features t/train · pretrained")
    assert torch.equal(got, silent)  # progress changes nothing
    assert console.file.getvalue().splitlines() == [
        "features t/train · pretrained: 80/140 images  5 images/s  eta 12s",  # 80 images in 16 s; 60 left
        "features t/train · pretrained: 140/140 images  7 images/s",
    ]


def test_table_lines_show_every_shot_count_with_its_spread() -> None:
    from bigmodel.transfer.runner import table_lines

    per = {"1": {"mean": 40.0, "std": 4.5, "runs": [1]}, "10": {"mean": 75.07, "std": 1.494, "runs": [1]}}
    rows = [{"task": "digits", "task_settings": {}, "protocol": "linear", "settings": {},
             "results": {"pretrained": {"top1": 93.111}, "pixels": {"top1": 97.0}}},
            {"task": "digits", "task_settings": {}, "protocol": "fewshot", "settings": {"primary": 10},
             "results": {"pretrained": {"top1": 75.07, "top1_std": 1.494, "per_shot": per}}}]
    assert table_lines(rows) == [
        ("digits", "linear", {"pretrained": "93.11", "pixels": "97.00"}),
        ("digits", "fewshot 1-shot", {"pretrained": "40.00 ± 4.50"}),
        ("digits", "fewshot 10-shot", {"pretrained": "75.07 ± 1.49"}),
    ]
