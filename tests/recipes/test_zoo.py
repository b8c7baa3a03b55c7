"""Every zoo recipe validates, opens with its command, runs end to end in tiny mode (on generated
MNIST-layout data), and reproduces its golden losses (on the real MNIST they were recorded on)."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from bigmodel import api
from bigmodel.data.base import expand_path, materialize
from bigmodel.recipe import resolve, zoo_names
from bigmodel.registry import DATASETS
from bigmodel.train import checkpoint
from bigmodel.transfer.base import pixels
from tests.recipes.test_golden import EMBEDDED, assert_golden, golden_overrides, logged_losses
from tests.transfer.test_reference import REFERENCES

# The recipes on embedded data (quickstart, fractals-vit) score the whole digits set in tiny mode (slow here):
# their golden runs are in test_golden.py, quickstart's tiny run end to end is the CLI's own smoke test
# (tests/test_cli.py). Every other zoo recipe runs end to end in tiny mode below.
TINY_RUNS = [n for n in zoo_names() if n not in EMBEDDED]


@pytest.mark.parametrize("name", zoo_names())
def test_recipe_opens_with_its_command_and_validates(name):
    from bigmodel.recipe import zoo_text

    assert zoo_text(name).startswith(f"# bigmodel run {name}")
    assert resolve(name, []).raw["run"].get("tiny") is not True
    assert resolve(name, ["run.tiny=true"]).run.tiny


@pytest.mark.realdata
@pytest.mark.parametrize("name", TINY_RUNS)
def test_recipe_reproduces_its_golden_losses(name, tmp_path, real_mnist_npz):
    """The recipe's golden run (pretraining) on the real MNIST the losses were recorded on: its
    losses are the recorded ones (test_golden.py)."""
    out = tmp_path / name
    recipe = resolve(name, [*golden_overrides(out), f"data.path={real_mnist_npz}", "run.figures=false"])
    assert api.run_pipeline(recipe, transfer=False)["pretrain"]["steps_done"] == recipe.optim.steps
    assert_golden(name, out)


@pytest.mark.parametrize("name", TINY_RUNS)
def test_recipe_runs_in_tiny_mode(name, tmp_path, synthetic_data):
    """The recipe's tiny run end to end on generated MNIST-layout data (tests/conftest.py): every
    step trains, its transfer rows are accuracies over the 300 tiny test images, and raw pixels
    score exactly what the scikit-learn / numpy references of tests/transfer/test_reference.py score."""
    out = tmp_path / name
    recipe = resolve(name, [*golden_overrides(out), "run.figures=false"])
    assert recipe.data.name != "npz" or expand_path(recipe.data.kwargs["path"]) == synthetic_data / "mnist.npz"
    result = api.run_pipeline(recipe)
    assert result["pretrain"]["steps_done"] == recipe.optim.steps
    assert list(logged_losses(out)) == [str(s) for s in range(1, recipe.optim.steps + 1)]
    assert [r["protocol"] for r in result["transfer"]] == ["linear", "knn"]
    for row, spec in zip(result["transfer"], recipe.transfer, strict=True):
        n = row["n_test"]
        assert (row["n_train"], n) == (300, 300)  # the tiny mode's task limit, both splits
        assert set(row["results"]) == {"pretrained", "random_init", "pixels"}
        for res in row["results"].values():  # a share of n images: a whole number of them right
            assert res["top1"] == pytest.approx(100 * round(res["top1"] * n / 100) / n, abs=1e-4)
        train, test = (materialize(DATASETS.build(spec.task.name, split=s, **spec.task.kwargs))
                       for s in ("train", "test"))
        expected = REFERENCES[row["protocol"]](row["settings"], pixels(train).numpy(), train.targets.numpy(),
                                               pixels(test).numpy(), test.targets.numpy())
        assert round(row["results"]["pixels"]["top1"] * n / 100) == expected
    assert (out / "report.json").is_file()
    if recipe.data.name == "npz" and recipe.objective.name != "supervised":
        assert recipe.data.kwargs["labels"] is False  # self-supervised recipes ignore labels
    if recipe.objective.name == "autoregressive":  # the fitted palette travels in the checkpoint
        weights = load_file(str(checkpoint.latest(out) / "model.safetensors"))
        assert weights["backbone.palette.fitted"].item() is True
