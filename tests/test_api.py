"""The scripting API (``import bigmodel``): run, load, transfer and resolve_recipe give what the CLI
and the run's own files give."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

import bigmodel
from bigmodel.cli import main
from bigmodel.data.digits import digits
from bigmodel.data.transforms import to_input
from bigmodel.recipe import RecipeError, resolve, zoo_text
from bigmodel.train import build
from tests.helpers import env

KNN = {"task": "digits", "protocol": "knn", "k": 20}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[bigmodel.Result, torch.nn.Module]:
    """A tiny quickstart run through ``bigmodel.run`` (kNN on digits only), and the objective it
    trained, caught as :func:`bigmodel.train.build.experiment` hands it to the run."""
    out = tmp_path_factory.mktemp("api") / "run"
    built = {}
    real = build.experiment

    def spy(recipe):
        data, model = real(recipe)
        built["model"] = model
        return data, model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "experiment", spy)
        result = bigmodel.run("fractals-vit", {"run.tiny": True, "run.out": str(out), "run.precision": "fp32",
                                             "run.figures": False, "transfer": [KNN]}, quiet=True)
    return result, built["model"]


def test_import_is_light() -> None:
    """``import bigmodel`` loads no heavy module; ``bigmodel.transfer`` stays callable once its
    subpackage is imported (as anything importing ``bigmodel.transfer.*`` does)."""
    code = "import sys, bigmodel; print(sorted(m for m in ('torch', 'bigmodel.api', 'yaml') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], env=env(), capture_output=True, text=True, check=True)
    assert proc.stdout == "[]\n"
    import bigmodel.transfer.knn  # here, long after import bigmodel

    assert callable(bigmodel.transfer) and bigmodel.transfer.knn.__name__ == "bigmodel.transfer.knn"
    assert set(bigmodel.__all__) <= set(dir(bigmodel))


def test_run_returns_the_report_it_wrote(tiny) -> None:
    result, _ = tiny
    assert result.report == json.loads((result.run_dir / "report.json").read_text())
    assert result.stopped is None and result.report["pretrain"]["steps_done"] == 6
    assert result.report["recipe"]["run"]["out"] == str(result.run_dir)
    assert result.report["recipe"]["architecture"]["size"] == "nano"  # the tiny keys applied
    assert result.report["recipe"]["run"]["figures"] is False and not (result.run_dir / "figures").exists()
    assert [(r["task"], r["protocol"], r["settings"]["k"]) for r in result.rows] == [("digits", "knn", 20)]
    assert set(result.rows[0]["results"]) == {"pretrained", "random_init", "pixels"}
    assert result.top1("digits", "knn") == result.rows[0]["results"]["pretrained"]["top1"]
    assert result.top1("digits", "knn", "pixels") == result.rows[0]["results"]["pixels"]["top1"]
    with pytest.raises(KeyError, match="0 rows for digits · linear"):
        result.top1("digits", "linear")


# (dict override, the same as a command-line argument, the message both give)
BAD = [
    ({"optim.stepz": 3}, "optim.stepz=3",
     "optim.stepz: unknown key; valid keys: name, lr, weight_decay, momentum, "
     "betas, batch_size, accum_steps, steps, warmup_steps, min_lr_ratio, grad_clip"),
    ({"optim.steps": 0}, "optim.steps=0", "optim.steps = 0: input should be greater than or equal to 1"),
    ({"optm.steps": 1}, "optm.steps=1", "optm: unknown section; valid: architecture, data, objective, optim, run, "
                                        "transfer, tiny"),
    ({"transfer.5.k": 3}, "transfer.5.k=3", "override transfer.5: index must be 0..2"),
    ({"objective.name": "mae", "architecture.name": "lstm"}, "objective.name=mae architecture.name=lstm",
     "objective 'mae' cannot train architecture 'lstm': it needs tokens, which 'lstm' lacks"),
]


@pytest.mark.parametrize(("overrides", "argv", "message"), BAD, ids=[b[1] for b in BAD])
def test_bad_overrides_raise_what_the_cli_prints(tmp_path, capsys, overrides, argv, message) -> None:
    out = tmp_path / "run"
    with pytest.raises(RecipeError) as raised:
        bigmodel.run("fractals-vit", {**overrides, "run.out": str(out)}, quiet=True)
    assert str(raised.value) == message
    assert main(["run", "fractals-vit", *argv.split(), f"run.out={out}"]) == 2
    assert capsys.readouterr().err == f"recipe error: {message}\n"
    assert not out.exists()


def test_overrides_take_the_cli_forms_and_sources() -> None:
    cli = ["run.tiny=true", "optim.lr=0.002", "data.name=npz", "data.path=/m.npz"]
    typed = {"run.tiny": True, "optim.lr": 0.002, "data.name": "npz", "data.path": "/m.npz"}
    notes: list[str] = []
    expected = resolve("fractals-vit", cli, note=notes.append).raw
    assert notes == ["tiny keys data.classes, data.images_per_class dropped: data is now npz"]
    for source in ("fractals-vit", yaml.safe_load(zoo_text("fractals-vit"))):
        for overrides in (typed, cli):
            got = []
            assert bigmodel.resolve_recipe(source, overrides, note=got.append).raw == expected
            assert got == notes
    # a resolved Recipe: overrides apply to its values, its tiny keys are not applied again
    r = bigmodel.resolve_recipe("fractals-vit", {"run.tiny": True, "run.out": "x", "optim.steps": 3})
    again = bigmodel.resolve_recipe(r, {"optim.lr": 0.01})
    assert again.raw == resolve("fractals-vit", ["run.tiny=true", "run.out=x", "optim.steps=3", "optim.lr=0.01"]).raw
    assert bigmodel.resolve_recipe(r) is r
    for bad in ({"": 1}, {3: 1}):
        with pytest.raises(RecipeError, match=r"expected a dotted section.key, e\.g\. optim\.lr"):
            bigmodel.resolve_recipe("fractals-vit", bad)
    with pytest.raises(TypeError, match="not the string"):
        bigmodel.resolve_recipe("fractals-vit", "run.tiny=true")


def test_load_gives_the_trained_backbone(tiny) -> None:
    result, trained = tiny
    images = digits(split="test").images[:32]  # uint8 (32, 1, 8, 8): preprocessing resizes to 32²
    dev = next(trained.parameters()).device  # the trained model stays where it trained (a GPU's, if any)
    with torch.no_grad():
        expected = trained.backbone.eval()(to_input(images, 32, 1).to(dev))
    for where in (result.run_dir, result.run_dir / "checkpoints" / "step_00000006"):
        m = bigmodel.load(where)
        assert (m.step, m.checkpoint.name) == (6, "step_00000006")
        assert m.objective.backbone is m.backbone and not m.backbone.training
        assert m.recipe.raw == result.report["recipe"]
        assert m.classes == [f"ifs{i}" for i in range(8)]  # the tiny fractals' classes
        assert torch.equal(m.preprocess(images), to_input(images, 32, 1).to(m.device))
        assert torch.equal(m.preprocess(images[0]), m.preprocess(images[:1]))
        assert torch.equal(m.features(images), expected)
        assert torch.equal(m.objective.head(m.features(images)), trained.head(expected))
    with pytest.raises(TypeError, match="uint8"):
        m.preprocess(images.float())


def test_transfer_scores_as_the_run_did(tiny) -> None:
    result, _ = tiny
    settings = {k: v for k, v in KNN.items() if k not in ("task", "protocol")}
    row = bigmodel.transfer(result.run_dir, task="digits", protocol="knn", quiet=True, **settings)
    assert list(row["results"]) == ["pretrained"]
    assert row["settings"] == result.rows[0]["settings"]
    assert row["results"]["pretrained"]["top1"] == result.top1("digits", "knn")
    saved = list((result.run_dir / "transfer").glob("digits-knn-*.json"))  # where the CLI saves it too
    assert [json.loads(p.read_text())["transfer"][0]["results"] for p in saved] == [row["results"]]
    m = bigmodel.load(result.run_dir)
    for subject in (m, m.backbone):  # the recipe is fp32: a bare backbone is scored the same
        again = bigmodel.transfer(subject, {"name": "digits"}, "knn", quiet=True, **settings)
        assert again["results"]["pretrained"]["top1"] == result.top1("digits", "knn")
    with pytest.raises(RecipeError, match="^transfer.0.protocol.kk: unknown key"):
        bigmodel.transfer(m, "digits", "knn", kk=3, quiet=True)
