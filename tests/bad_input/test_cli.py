"""The command line as people use it: switching a component, ``zoo NAME``, protocol settings a task
cannot serve (``bigmodel transfer ... --set k=100000``, a recipe's or a suite's entry), and export /
predict mistakes (a format or a model timm cannot take, an image that is not there or not an image,
a checkpoint without a class head)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from bigmodel.cli import main
from bigmodel.recipe import resolve
from tests.bad_input.case import Case, check, params

_CACHE: dict[str, Path] = {}
KNN_LIMIT = "k = 100000 is more than the 1347 training images; use k <= 1347"
ONE_CLASS = "the task's training split has only class 0; a transfer protocol needs at least 2 classes"


def _with_run(tmp: Path) -> None:
    """``tmp/run``: a tiny pretrained quick-start run (trained once per session, then copied)."""
    if "run" not in _CACHE:
        out = Path(tempfile.mkdtemp(prefix="bigmodel-cli-")) / "run"
        assert main(["pretrain", "fractals-vit", "run.tiny=true", "architecture.image_size=16",
                     "data.image_size=16", f"run.out={out}"]) == 0
        _CACHE["run"] = out
    shutil.copytree(_CACHE["run"], tmp / "run")


def _with_one_class_task(tmp: Path) -> None:
    _with_run(tmp)
    x, y = np.zeros((6, 8, 8), np.uint8), np.zeros(6, np.int64)
    np.savez(tmp / "one.npz", x_train=x, y_train=y, x_test=x, y_test=y)


def _with_suite(tmp: Path) -> None:
    _with_run(tmp)
    (tmp / "suite.yaml").write_text(yaml.safe_dump({"transfer": [
        {"task": "digits", "protocol": "linear"}, {"task": "digits", "protocol": "knn", "k": 100000}]}))


def _saved_recipe_is_digits_and_resolves_again(tmp: Path) -> None:
    saved = tmp / "r" / "recipe.yaml"
    assert yaml.safe_load(saved.read_text())["data"] == {"name": "digits"}
    assert resolve(saved, note=pytest.fail).data.kwargs == {}


def _no_transfer_file(tmp: Path) -> None:
    assert not (tmp / "run" / "transfer").exists()


def _with_small_stem_resnet(tmp: Path) -> None:
    from tests.test_export import saved_run

    saved_run(tmp, "supervised-resnet", ["run.tiny=true"], name="resnet")  # 28 px: the small-image stem


def _with_mae_checkpoint(tmp: Path) -> None:
    from tests.test_export import saved_run

    saved_run(tmp, "mae-vit", ["run.tiny=true"], name="mae")


def _with_text_named_png(tmp: Path) -> None:
    _with_run(tmp)
    (tmp / "notes.png").write_text("a shopping list, not an image\n")


TRANSFER = ["transfer", "{tmp}/run", "--task", "digits"]

CASES = [
    Case("zoo-unknown", ["zoo", "nosuch"], 2,
         "recipe error: zoo 'nosuch': no such recipe; zoo: byol-resnet, fractals-vit, igpt, mae-vit, mae-vit-moe, "
         "pixel-lstm, quickstart, "),
    Case("switch-data-tiny-missing-key", ["run", "run.tiny=true", "data.name=npz", "run.out={tmp}/r"], 2,
         "recipe error: data.path: required key is missing", absent=("r",)),
    Case("switch-data-tiny-note", ["pretrain", "fractals-vit", "run.tiny=true", "data.name=digits",
                                   "architecture.image_size=16", "run.out={tmp}/r"], 0,
         "note: tiny keys data.classes, data.images_per_class dropped: data is now digits\n",
         exists=("r/recipe.yaml",), check=_saved_recipe_is_digits_and_resolves_again),
    Case("run-recipe-entry-knn-k", ["run", "fractals-vit", "run.tiny=true", "transfer.1.k=100000", "run.out={tmp}/r"],
         2, f"recipe error: transfer.1 (digits · knn): {KNN_LIMIT}", absent=("r",)),
    Case("transfer-set-knn-k", [*TRANSFER, "--protocol", "knn", "--set", "k=100000"], 2,
         f"recipe error: transfer.0 (digits · knn): {KNN_LIMIT}", setup=_with_run, check=_no_transfer_file),
    Case("transfer-set-fewshot-shots", [*TRANSFER, "--protocol", "fewshot", "--set", "shots=[1, 500]"], 2,
         "recipe error: transfer.0 (digits · fewshot): shots = [1, 500]: 500 shots per class, but class 8 has "
         "only 131 training images; use shots <= 131", setup=_with_run, check=_no_transfer_file),
    Case("transfer-suite-entry-knn-k", ["transfer", "{tmp}/run", "--suite", "{tmp}/suite.yaml"], 2,
         f"recipe error: transfer.1 (digits · knn): {KNN_LIMIT}", setup=_with_suite, check=_no_transfer_file),
    Case("transfer-one-class-task", ["transfer", "{tmp}/run", "--task", "{tmp}/one.npz", "--protocol", "linear"], 2,
         f"recipe error: transfer.0 (one · linear): {ONE_CLASS}", setup=_with_one_class_task,
         check=_no_transfer_file),
    Case("ensemble-one-class-task", ["ensemble", "{tmp}/run", "--task", "{tmp}/one.npz", "--out", "{tmp}/e.json"],
         2, f"recipe error: ensemble on one: {ONE_CLASS}", setup=_with_one_class_task, absent=("e.json",)),
    Case("export-unknown-format", ["export", "{tmp}/run", "--format", "tflite"], 2,
         "export error: export --format 'tflite': unknown format; valid: timm, onnx, safetensors", setup=_with_run,
         absent=("run/export",)),
    Case("export-no-checkpoint", ["export", "{tmp}/nothing", "--format", "onnx"], 2,
         "/nothing: no such run directory or checkpoint folder"),
    Case("export-timm-small-stem", ["export", "{tmp}/resnet", "--format", "timm"], 2,
         "export error: export --format timm: architecture.stem='auto' at image_size=28 is the small-image stem",
         setup=_with_small_stem_resnet, absent=("resnet/export",)),
    Case("predict-missing-image", ["predict", "{tmp}/run", "{tmp}/nope.png"], 2, "/nope.png: no such file",
         setup=_with_run),
    Case("predict-not-an-image", ["predict", "{tmp}/run", "{tmp}/notes.png"], 2,
         "/notes.png: not an image PIL can read (UnidentifiedImageError: ", setup=_with_text_named_png),
    Case("predict-self-supervised", ["predict", "{tmp}/mae", "{tmp}/any.png"], 2,
         "is a mae checkpoint (self-supervised): it has no class head. Fine-tune it on labelled data first",
         setup=_with_mae_checkpoint),
    Case("predict-top-k", ["predict", "{tmp}/run", "{tmp}/any.png", "--top-k", "0"], 2,
         "recipe error: predict --top-k 0: must be at least 1", setup=_with_run),
]


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    err = check(case, tmp_path, capsys, monkeypatch)
    assert err.count("note:") == (1 if "note" in case.id else 0)  # a note is printed once, never with an error
