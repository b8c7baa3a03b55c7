"""Bad data: one ``data error:`` line naming the file and the array (or folder, shard, key), exit 2,
no run directory; a recipe that does not fit good data is a ``recipe error:``. Data files are written
by each row's setup; nothing here needs the shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bigmodel.data.base import TensorImages
from bigmodel.data.shards import write_shards
from tests.bad_input.case import Case, check, params

Y = np.arange(128) % 10
X = np.zeros((128, 8, 8), np.uint8)


def _npz(name: str = "bad.npz", **arrays) -> callable:
    def setup(tmp: Path) -> None:
        np.savez(tmp / name, **{"x_train": X, "y_train": Y, "x_test": X, "y_test": Y, **arrays})
    return setup


def _recipe(data: dict, objective: str = "supervised") -> dict:
    return {"architecture": {"name": "vit", "size": "nano", "image_size": 8, "patch_size": 4, "in_chans": 1},
            "data": data, "objective": {"name": objective}, "optim": {"batch_size": 4, "steps": 1, "warmup_steps": 0}}


def _folder(classes: dict[str, str]) -> callable:
    """``classes``: split folder (``""`` for none) → class names; one 8×8 PNG in each class folder."""
    def setup(tmp: Path) -> None:
        for split, names in classes.items():
            for c in names:
                (tmp / "imgs" / split / c).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8), ord(c), np.uint8)).save(tmp / "imgs" / split / c / "0.png")
        (tmp / "r.yaml").write_text(yaml.safe_dump(_recipe({"name": "imagefolder", "root": str(tmp / "imgs"),
                                                             "channels": 1})))
    return setup


def _images(files: dict[str, int | None], **data) -> callable:
    """``files``: path under ``imgs/`` → side of a grey square PNG, or ``None`` for a text file by that name;
    the recipe ``r.yaml`` reads them as an imagefolder (no holdout: every file is in ``train``)."""
    def setup(tmp: Path) -> None:
        for rel, side in files.items():
            (tmp / "imgs" / rel).parent.mkdir(parents=True, exist_ok=True)
            if side is None:
                (tmp / "imgs" / rel).write_text("not an image")
            else:
                Image.fromarray(np.full((side, side), len(rel), np.uint8)).save(tmp / "imgs" / rel)
        (tmp / "r.yaml").write_text(yaml.safe_dump(_recipe({"name": "imagefolder", "root": "imgs", "channels": 1,
                                                             "test_fraction": 0, **data})))
    return setup


def _short_shard(tmp: Path) -> None:
    """Shards of 10 grey 8×8 images at ``sh/``, the second replaced by a shard of 2: its index says 10."""
    images, labels = torch.zeros(30, 1, 8, 8, dtype=torch.uint8), torch.arange(30) % 3
    write_shards(TensorImages(images, labels), tmp / "sh", "train", 10)
    write_shards(TensorImages(images[:2], labels[:2]), tmp / "short", "train", 10)
    (tmp / "short" / "train-000000.tar").replace(tmp / "sh" / "train-000001.tar")
    (tmp / "r.yaml").write_text(yaml.safe_dump(_recipe({"name": "shards", "urls": "sh"})))


def _text_npz(tmp: Path) -> None:
    (tmp / "bad.npz").write_text("x,y\n1,2\n")


SUPERVISED = ["run", "supervised-vit", "run.tiny=true", "data.path={tmp}/bad.npz", "run.out={tmp}/r"]
CASES = [
    Case("label-57", SUPERVISED, 2,
         "bad.npz: y_train has labels 57 (1 image, first at index 127) but no image of class 10",
         setup=_npz(y_train=np.r_[Y[:-1], 57]), absent=("r",)),
    Case("label-minus-1", SUPERVISED, 2, "bad.npz: y_train has negative labels -1 (2 images, first at index 126); "
         "-1 marks unlabelled images: set labels=false", setup=_npz(y_train=np.r_[Y[:-2], -1, -1]), absent=("r",)),
    Case("label-float", SUPERVISED, 2, "bad.npz: y_train must hold integer class indices, got float64",
         setup=_npz(y_train=Y / 1.0), absent=("r",)),
    Case("label-57-in-test", SUPERVISED, 2, "bad.npz: y_test has labels 57",
         setup=_npz(y_test=np.r_[Y[:-1], 57]), absent=("r",)),
    Case("empty-arrays", SUPERVISED, 2, "bad.npz: x_train is empty (shape (0, 8, 8))",
         setup=_npz(x_train=X[:0], y_train=Y[:0]), absent=("r",)),
    Case("text-named-npz", SUPERVISED, 2, "bad.npz: not an .npz archive", setup=_text_npz, absent=("r",)),
    Case("five-channels", SUPERVISED, 2, "bad.npz: x_train has shape (128, 8, 8, 5): expected (N, H, W), (N, H, W, C) "
         "or (N, C, H, W) with C = 1 or 3", setup=_npz(x_train=np.zeros((128, 8, 8, 5), np.uint8)), absent=("r",)),
    Case("not-square", SUPERVISED, 2, "bad.npz: x_train: images must be square, got 8x6",
         setup=_npz(x_train=np.zeros((128, 8, 6), np.uint8)), absent=("r",)),
    Case("missing-file", ["run", "supervised-vit", "run.tiny=true", "data.path=nowhere/mnist.npz",
                          "run.out={tmp}/r"], 2,
         "npz path='nowhere/mnist.npz': no such file; looked for ", absent=("r",)),
    Case("batch-larger-than-data", ["run", "igpt", "run.tiny=true", "data.path={tmp}/ok.npz", "optim.batch_size=100000",
                                    "run.out={tmp}/r"], 2,
         "optim.batch_size = 100000 is larger than the training set (128 images); "
         "lower optim.batch_size to at most 128",
         setup=_npz("ok.npz"), absent=("r",)),
    Case("one-class-folder", ["run", "{tmp}/r.yaml", "run.out={tmp}/r"], 2,
         "objective 'supervised' needs at least 2 classes; data 'imagefolder' has only one ('a')",
         setup=_folder({"": "a"}), absent=("r",)),
    Case("test-class-not-in-train", ["run", "{tmp}/r.yaml", "run.out={tmp}/r"], 2,
         "/imgs': test/ has classes that train/ lacks: c (1)", setup=_folder({"train": "ab", "test": "abc"}),
         absent=("r",)),
    Case("shard-shorter-than-index", ["run", "{tmp}/r.yaml", "run.out={tmp}/r"], 2,
         "data error: shard sh/train-000001.tar holds fewer samples than its index says (2 of 10); "
         "rewrite the index or the shard", setup=_short_shard, absent=("r",)),
    Case("folder-without-images", ["run", "{tmp}/r.yaml", "run.out={tmp}/r"], 2,
         "data error: data.root='imgs': no image files found for split 'train' (ignored 1 files without an image "
         "extension, e.g. notes.txt)", setup=_images({"a/notes.txt": None}), absent=("r",)),
    Case("folder-too-many-unreadable", ["run", "{tmp}/r.yaml", "run.out={tmp}/r"], 2,
         "data error: imagefolder 'imgs': 1 of 5 files (20.0%) could not be read, more than "
         "data.max_bad_fraction=0.01 allows; fix or remove them, or raise data.max_bad_fraction. "
         "First: imgs/b/bad.png: ",
         setup=_images({"a/0.png": 8, "a/1.png": 8, "b/0.png": 8, "b/1.png": 8, "b/bad.png": None}), absent=("r",)),
    Case("folder-sizes-differ", ["run", "{tmp}/r.yaml", "run.out={tmp}/r"], 2,
         "data error: imagefolder 'imgs': images are not squares of one size (0.png 8x8, 1.png 6x6); "
         "set data.image_size to resize and centre-crop them",
         setup=_images({"a/0.png": 8, "b/1.png": 6}), absent=("r",)),
    Case("shard-a-bad-npz", ["data", "shard", "npz", "path={tmp}/bad.npz", "{tmp}/sh"], 2,
         "bad.npz: x_train is empty (shape (0, 8, 8)); it needs at least one image",
         setup=_npz(x_train=X[:0], y_train=Y[:0]),
         absent=("sh",)),
]
RECIPE_ERRORS = {"batch-larger-than-data", "one-class-folder"}  # good data, a recipe that does not fit it


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case, tmp_path, capsys, monkeypatch):
    err = check(case, tmp_path, capsys, monkeypatch)
    assert err.startswith("recipe error: " if case.id in RECIPE_ERRORS else "data error: "), err


def test_missing_shared_file_says_where_it_looked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BIGMODEL_SHARED_DATA", str(tmp_path / "shared"))
    case = Case("no-shared-data", ["run", "supervised-vit", "run.tiny=true",
                                   "data.path=$BIGMODEL_SHARED_DATA/mnist.npz", "run.out={tmp}/r"], 2,
                f"npz path='$BIGMODEL_SHARED_DATA/mnist.npz': no such file; "
                f"looked for {tmp_path / 'shared' / 'mnist.npz'} "
                f"($BIGMODEL_SHARED_DATA as set); set BIGMODEL_SHARED_DATA=/folder/with/the/data", absent=("r",))
    check(case, tmp_path, capsys, monkeypatch)


def test_a_batch_larger_than_memory(tmp_path, capsys, monkeypatch):
    """The views of one batch (fp32) and the model's training state, against a faked 1 MiB of free memory."""
    from bigmodel.recipe import resolve
    from bigmodel.train import build

    _npz("ok.npz")(tmp_path)
    argv = ["run", "igpt", "run.tiny=true", f"data.path={tmp_path}/ok.npz", "optim.batch_size=128", "run.out={tmp}/r"]
    recipe = resolve(argv[1], [a.replace("{tmp}", str(tmp_path)) for a in argv[2:]])
    data, model = build.experiment(recipe)
    need = build.batch_memory(recipe, data, model)
    assert need == 128 * 8 * 8 * 4 + 16 * sum(p.numel() for p in model.parameters())  # one grey 8×8 view (igpt tiny)
    monkeypatch.setattr(build, "available_memory", lambda dev: 2**20)
    case = Case("batch-larger-than-memory", argv, 2,
                f"optim.batch_size = 128 needs at least {need / 2**30:.1f} GiB (the batch's views and the model's "
                f"weights, gradients and optimizer state, before activations), more than the 0.0 GiB free on",
                absent=("r",))
    check(case, tmp_path, capsys, monkeypatch)
