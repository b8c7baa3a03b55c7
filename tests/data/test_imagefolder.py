"""imagefolder: layouts, splits (one class list for train/ and test/), resizing, files that are not
images ignored, and unreadable images skipped, counted, listed — or stopping the build."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bigmodel.data.imagefolder import imagefolder
from bigmodel.errors import DataError
from bigmodel.registry import DATASETS
from tests.helpers import env


def _png(path: Path, value: int, size: tuple[int, int] = (16, 16), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(value)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    arr[0, 0] = value  # a pixel that identifies the image
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """Two classes of 8 good images each, plus a truncated PNG, a text file named .jpg, and files that
    are not images by name (notes.txt, Thumbs.db, .DS_Store)."""
    root = tmp_path / "messy"
    for c, name in enumerate(("cat", "dog")):
        for i in range(8):
            _png(root / name / f"{i}.png", 10 * c + i)
    data = _png(root / "cat" / "zz_truncated.png", 99)
    (root / "cat" / "zz_truncated.png").write_bytes(data[: len(data) // 2])
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "fake.jpg").write_text("not a jpeg either")
    (root / "dog" / ".DS_Store").write_text("hidden files are not candidates")
    (root / "cat" / "Thumbs.db").write_bytes(b"\x00" * 64)
    return root


def test_bad_files_are_skipped_counted_and_listed(messy: Path, caplog):
    with caplog.at_level("WARNING"):
        ds = imagefolder(str(messy), max_bad_fraction=0.2, test_fraction=0.0)
    assert len(ds) == 16 and ds.candidates == 18
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.labels().tolist() == [0] * 8 + [1] * 8
    bad = {Path(p).name: reason for p, reason in ds.skipped}
    assert set(bad) == {"zz_truncated.png", "fake.jpg"}
    assert sorted(Path(p).name for p in ds.ignored) == [".DS_Store", "Thumbs.db", "notes.txt"]
    assert "truncated" in bad["zz_truncated.png"].lower()
    for name in bad:  # each one is in the log, with its path
        assert any(name in rec.getMessage() for rec in caplog.records)
    assert ds.images.shape == (16, 3, 16, 16)


def test_threshold_stops_the_build_with_a_clear_message(messy: Path):
    with pytest.raises(DataError) as err:
        imagefolder(str(messy), test_fraction=0.0)  # default max_bad_fraction=0.01
    msg = str(err.value)
    assert "2 of 18 files" in msg and "11.1%" in msg and "data.max_bad_fraction=0.01" in msg


def test_stray_non_image_files_do_not_count_as_bad(tmp_path: Path):
    """One notes.txt among 10 images used to be 1 bad file in 11 (9%), past the default 1%."""
    for i in range(10):
        _png(tmp_path / "a" / f"{i}.png", i)
        _png(tmp_path / "b" / f"{i}.png", 20 + i)
    (tmp_path / "a" / "notes.txt").write_text("taken at the zoo")
    (tmp_path / "README.md").write_text("no class")  # directly in a labelled root: no class
    ds = imagefolder(str(tmp_path), test_fraction=0.0)
    assert len(ds) == 20 and ds.skipped == [] and ds.candidates == 20
    assert sorted(Path(p).name for p in ds.ignored) == ["README.md", "notes.txt"]


def test_flat_folder_is_unlabelled_grey_and_resized(tmp_path: Path):
    for i in range(5):
        _png(tmp_path / f"img{i}.png", i, size=(20, 12))  # not square: needs image_size
    with pytest.raises(DataError, match="image_size"):
        imagefolder(str(tmp_path), test_fraction=0.0)
    ds = imagefolder(str(tmp_path), image_size=8, channels=1, test_fraction=0.0)
    assert ds.images.shape == (5, 1, 8, 8) and ds.num_classes == 0
    assert ds.labels().tolist() == [-1] * 5


def test_train_and_test_share_the_train_class_list(tmp_path: Path):
    """train/ has a, b, c; test/ has a, c: c is class 2 in both splits (it was 1 in test)."""
    for split, classes in (("train", "abc"), ("test", "ac")):
        for c in classes:
            _png(tmp_path / split / c / "0.png", ord(c))
    train, test = imagefolder(str(tmp_path), split="train"), imagefolder(str(tmp_path), split="test")
    assert train.classes == test.classes == ["a", "b", "c"] and train.num_classes == test.num_classes == 3
    assert train.labels().tolist() == [0, 1, 2] and test.labels().tolist() == [0, 2]
    assert test.images[:, 0, 0, 0].tolist() == [ord("a"), ord("c")]


def test_a_test_class_missing_from_train_is_an_error(tmp_path: Path):
    for split, classes in (("train", "ab"), ("test", "abd")):
        for c in classes:
            _png(tmp_path / split / c / "0.png", ord(c))
    for split in ("train", "test"):
        with pytest.raises(DataError) as err:
            imagefolder(str(tmp_path), split=split)
        assert str(err.value) == (f"imagefolder {str(tmp_path)!r}: test/ has classes that train/ lacks: d (1); every "
                                  f"test class needs a train/ folder (the class list is train/'s: a, b)")


def test_train_and_test_folders_are_the_splits(tmp_path: Path):
    for split, n in (("train", 3), ("test", 2)):
        for c in ("a", "b"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", i)
    assert len(imagefolder(str(tmp_path), split="train")) == 6
    assert len(imagefolder(str(tmp_path), split="test")) == 4


def test_holdout_split_is_disjoint_stratified_and_repeatable(tmp_path: Path):
    for c in ("a", "b"):
        for i in range(10):
            _png(tmp_path / c / f"{i}.png", 20 * (c == "b") + i)
    train = imagefolder(str(tmp_path), split="train", test_fraction=0.3)
    test = imagefolder(str(tmp_path), split="test", test_fraction=0.3)
    assert test.labels().tolist() == [0, 0, 0, 1, 1, 1] and len(train) == 14
    ids = lambda ds: set(ds.images[:, 0, 0, 0].tolist())  # noqa: E731
    assert ids(train).isdisjoint(ids(test)) and len(ids(train) | ids(test)) == 20
    assert ids(imagefolder(str(tmp_path), split="test", test_fraction=0.3)) == ids(test)


def test_recipe_schema_and_missing_root():
    fields = set(DATASETS.config_model("imagefolder").model_fields)
    assert {"root", "image_size", "channels", "max_bad_fraction"} <= fields
    with pytest.raises(DataError, match="no such folder") as err:
        imagefolder("/nonexistent/folder")
    assert isinstance(err.value, FileNotFoundError)  # callers catching that still do


def test_run_lists_skipped_files_in_its_report(messy: Path, tmp_path: Path):
    import json

    from rich.console import Console

    from bigmodel import api
    from bigmodel.recipe import validate

    recipe = validate({
        "architecture": {"name": "vit", "size": "nano", "image_size": 8, "patch_size": 4, "in_chans": 3},
        "data": {"name": "imagefolder", "root": str(messy), "image_size": 8, "max_bad_fraction": 0.2,
                 "test_fraction": 0.0},
        "objective": {"name": "supervised"},
        "optim": {"batch_size": 4, "steps": 1, "warmup_steps": 0},
        "run": {"out": str(tmp_path / "run")}})
    result = api.run_pipeline(recipe, Console(quiet=True), transfer=False)
    listed = json.loads((tmp_path / "run" / "report.json").read_text())["data"]["skipped"]
    assert {Path(s["path"]).name for s in listed} == {"zz_truncated.png", "fake.jpg"}
    assert result["data"]["skipped"] == listed
    ignored = json.loads((tmp_path / "run" / "report.json").read_text())["data"]["ignored"]
    assert sorted(Path(p).name for p in ignored) == [".DS_Store", "Thumbs.db", "notes.txt"]


def test_links_to_parent_folders_are_followed_once_and_do_not_loop(tmp_path: Path):
    """``os.walk(followlinks=True)`` entered ``sub/up -> ..`` and ``sub/self -> .`` again and again
    (2 new folders per level, until the kernel's 40-link limit: it never ended). Each real folder
    is listed once; a link to a folder outside the class is followed as before. Run in a child
    process with a timeout, so that a regression fails instead of hanging the suite."""
    root = tmp_path / "loops"
    _png(root / "cat" / "a.png", 1)
    _png(root / "cat" / "sub" / "b.png", 2)
    (root / "cat" / "sub" / "up").symlink_to("..")
    (root / "cat" / "sub" / "self").symlink_to(".")
    _png(tmp_path / "elsewhere" / "d.png", 4)
    _png(root / "dog" / "c.png", 3)
    (root / "dog" / "again").symlink_to("../dog")
    (root / "dog" / "more").symlink_to(tmp_path / "elsewhere")
    code = ("import json, sys; from bigmodel.data.imagefolder import imagefolder; "
            "d = imagefolder(sys.argv[1], test_fraction=0); "
            "print(json.dumps([d.targets.tolist(), d.images[:, 0, 0, 0].tolist(), d.classes]))")
    proc = subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120,
                          env=env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [[0, 0, 1, 1], [1, 2, 3, 4], ["cat", "dog"]]
