"""Ensembles: fine-tuned members combined by the mean of their probabilities, reported against
every member."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bigmodel import cli
from bigmodel.data.digits import digits
from bigmodel.transfer.ensemble import ensemble, scores
from bigmodel.transfer.finetune import Finetune


def test_scores_of_probabilities():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    out = scores(probs, torch.tensor([0, 1, 1]))
    assert out["top1"] == pytest.approx(200 / 3)
    assert out["nll"] == pytest.approx(-(torch.tensor([0.9, 0.6, 0.3]).log().mean().item()))


def test_ensemble_reports_members_and_ensemble(tiny_mlp):
    train, test = digits(split="train"), digits(split="test")
    protocol = Finetune(steps=30, batch_size=64, lr=0.3, flip=False)
    one = ensemble([("a", tiny_mlp(0))], train, test, protocol)
    assert one["ensemble"]["top1"] == pytest.approx(one["members"][0]["top1"])  # the mean of one is itself
    three = ensemble([("a", tiny_mlp(0)), ("b", tiny_mlp(1)), ("a", tiny_mlp(0))], train, test, protocol)
    assert [m["member"] for m in three["members"]] == ["a", "b", "a"]
    assert [m["seed"] for m in three["members"]] == [0, 1, 2]
    assert three["members"][0]["top1"] == one["members"][0]["top1"]
    assert three["members"][2]["top1"] != three["members"][0]["top1"]  # same backbone, another seed
    assert three["ensemble"]["size"] == 3
    # the ensemble is the mean of the members' probabilities: refit the members (seed i each) and
    # score that mean directly with numpy
    member_probs = [protocol.predict_proba(protocol.fit(net, train, seed=protocol.seed + i)[0], test).numpy()
                    for i, net in enumerate([tiny_mlp(0), tiny_mlp(1), tiny_mlp(0)])]
    probs = np.mean(member_probs, axis=0)
    y = test.targets.numpy()
    assert round(three["ensemble"]["top1"] * len(y) / 100) == int((probs.argmax(1) == y).sum())
    assert three["ensemble"]["nll"] == pytest.approx(float(-np.log(probs[np.arange(len(y)), y]).mean()), rel=1e-5)
    assert three["best_member_top1"] == max(m["top1"] for m in three["members"])
    assert three["gain_over_best"] == three["ensemble"]["top1"] - three["best_member_top1"]
    # pairwise disagreement: % of test images on which members i and j predict different classes
    preds = [p.argmax(1) for p in member_probs]
    expected = [[100.0 * float((a != b).mean()) for b in preds] for a in preds]
    assert np.allclose(three["disagreement"], expected, atol=1e-4)
    assert [three["disagreement"][i][i] for i in range(3)] == [0.0, 0.0, 0.0]
    assert three["disagreement"][0][2] > 0  # same backbone, another seed: the members differ somewhere
    assert all(m["schedule"]["steps"] == 30 for m in three["members"])


def test_cli_ensemble_of_checkpoints(tiny_run, tmp_path):
    out = tmp_path / "ens.json"
    code = cli.main(["ensemble", str(tiny_run), str(tiny_run), "--task", "digits", "--set", "steps=3",
                     "--set", "batch_size=16", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert len(result["members"]) == 2 and result["ensemble"]["size"] == 2
    assert result["task"] == "digits" and result["settings"]["steps"] == 3
    assert all(m["step"] == 6 for m in result["members"])
    assert result["provenance"]["checkpoints"] == [str(tiny_run)] * 2
    assert cli.main(["ensemble", str(tmp_path / "missing"), "--task", "digits"]) == 2
