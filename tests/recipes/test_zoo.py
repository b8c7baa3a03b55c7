"""Every zoo recipe validates, opens with its command, and runs end to end in tiny mode."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from bigmodel import api
from bigmodel.recipe import load_raw, resolve, zoo_names
from bigmodel.train import checkpoint

SHARED = "$BIGMODEL_SHARED_DATA/"
# quickstart's tiny mode scores the whole embedded digits set (slow here); it is the CLI's own
# smoke test. Every other zoo recipe runs end to end in tiny mode below.
TINY_RUNS = [n for n in zoo_names() if n != "quickstart"]


def _data_overrides(raw: dict, request: pytest.FixtureRequest) -> list[str]:
    """Point every ``$BIGMODEL_SHARED_DATA/<file>`` path of a recipe at the test fixture for that file
    (which skips the test when the file is absent)."""
    fixtures = {"mnist.npz": "mnist_npz", "cifar10.npz": "cifar10_npz"}
    out = []
    sections = [("data", raw.get("data") or {})]
    sections += [(f"transfer.{i}.task", t["task"]) for i, t in enumerate(raw.get("transfer") or [])
                 if isinstance(t.get("task"), dict)]
    for key, section in sections:
        path = str(section.get("path", ""))
        if path.startswith(SHARED):
            out.append(f"{key}.path={request.getfixturevalue(fixtures[path[len(SHARED):]])}")
    return out


@pytest.mark.parametrize("name", zoo_names())
def test_recipe_opens_with_its_command_and_validates(name):
    from bigmodel.recipe import zoo_text

    assert zoo_text(name).startswith(f"# bigmodel run {name}")
    assert resolve(name, []).raw["run"].get("tiny") is not True
    assert resolve(name, ["run.tiny=true"]).run.tiny


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_RUNS)
def test_recipe_runs_in_tiny_mode(name, tmp_path, request):
    overrides = _data_overrides(load_raw(name), request)
    recipe = resolve(name, ["run.tiny=true", f"run.out={tmp_path / name}", *overrides])
    result = api.run(recipe)
    assert result["pretrain"]["steps_done"] == recipe.optim.steps
    assert [r["protocol"] for r in result["transfer"]] == ["linear", "knn"]
    for row in result["transfer"]:
        assert set(row["results"]) == {"pretrained", "random_init", "pixels"}
        assert all(0 <= r["top1"] <= 100 for r in row["results"].values())
    assert (tmp_path / name / "report.json").is_file()
    metrics = [json.loads(ln) for ln in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(math.isfinite(m["loss"]) for m in metrics)
    if recipe.data.name == "npz" and recipe.objective.name != "supervised":
        assert recipe.data.kwargs["labels"] is False  # self-supervised recipes ignore labels
    if "moe" in recipe.architecture.kwargs:
        assert all(m["aux_loss"] > 0 for m in metrics)
    if recipe.objective.name == "autoregressive":  # the fitted palette travels in the checkpoint
        weights = load_file(str(checkpoint.latest(tmp_path / name) / "model.safetensors"))
        assert weights["backbone.palette.fitted"].item()
