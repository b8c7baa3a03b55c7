"""The zoo recipes of the token families run end to end in tiny mode through ``bigmodel.api.run``
(pretrain on MNIST without labels → linear and kNN on MNIST → report)."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console
from safetensors.torch import load_file

from bigmodel import api
from bigmodel.recipe import resolve
from bigmodel.train import checkpoint


@pytest.mark.parametrize("name", ["mae-vit", "mae-vit-moe", "igpt", "pixel-lstm"])
def test_zoo_recipe_runs_tiny(name: str, mnist_npz, tmp_path) -> None:
    recipe = resolve(name, ["run.tiny=true", f"run.out={tmp_path / 'run'}", f"data.path={mnist_npz}",
                            f"transfer.0.task.path={mnist_npz}", f"transfer.1.task.path={mnist_npz}"])
    assert recipe.data.kwargs["labels"] is False
    result = api.run(recipe, console=Console(quiet=True))
    assert result["pretrain"]["steps_done"] == recipe.optim.steps
    assert [r["protocol"] for r in result["transfer"]] == ["linear", "knn"]
    for row in result["transfer"]:
        assert set(row["results"]) == {"pretrained", "random_init", "pixels"}
        assert all(0 <= r["top1"] <= 100 for r in row["results"].values())
    metrics = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(math.isfinite(m["loss"]) for m in metrics)
    if name == "mae-vit-moe":
        assert all(m["aux_loss"] > 0 for m in metrics)
    if recipe.objective.name == "autoregressive":  # the fitted palette travels in the checkpoint
        weights = load_file(str(checkpoint.latest(tmp_path / "run") / "model.safetensors"))
        assert weights["backbone.palette.fitted"].item()
