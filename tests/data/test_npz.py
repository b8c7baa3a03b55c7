"""npz: layouts (channels first and last), label checks against the class count, and errors that
name the file and the array; the data folders (``$BIGMODEL_DATA/<file>`` found in ``$BIGMODEL_DATA``
then ``$BIGMODEL_SHARED_DATA``), and the one line a zoo recipe prints when its data is in neither."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel.data.base import channels_first, expand_path, shared_data, user_data
from bigmodel.data.npz import npz
from bigmodel.errors import DataError

Y = np.arange(20) % 10


def _write(path: Path, **arrays: np.ndarray) -> str:
    base = {"x_train": _images(20), "y_train": Y, "x_test": _images(20), "y_test": Y}
    np.savez(path, **{**base, **arrays})
    return str(path)


def _images(n: int, shape: tuple[int, ...] = (6, 6)) -> np.ndarray:
    """``n`` images whose pixels are all their index: ``x[i] == i``."""
    return np.broadcast_to(np.arange(n, dtype=np.uint8).reshape(n, *[1] * len(shape)), (n, *shape)).copy()


def test_labels_and_class_count(tmp_path: Path):
    ds = npz(_write(tmp_path / "ok.npz"), split="test", limit=7)
    assert ds.labels().tolist() == list(range(7)) and ds.num_classes == 10
    assert ds.images[:, 0, 0, 0].tolist() == list(range(7))


def test_a_declared_count_allows_empty_classes(tmp_path: Path):
    path = _write(tmp_path / "d.npz", y_train=np.r_[Y[:-1], 57])
    assert npz(path, num_classes=58).num_classes == 58
    assert npz(path, split="test", num_classes=58).num_classes == 58  # both splits agree


@pytest.mark.parametrize(("arrays", "kwargs", "message"), [
    ({"y_train": np.r_[Y[:-1], 57]}, {},
     "y_train has labels 57 (1 image, first at index 19) but no image of class 10 (47 of classes 0..57 are empty); "
     "fix the labels, or declare the class count with num_classes=58"),
    ({"y_test": np.r_[Y[:-1], 57]}, {"split": "train"},  # a bad test label is caught whichever split is read
     "y_test has labels 57 (1 image, first at index 19) but no image of class 10"),
    ({"y_train": np.r_[Y[:-3], -1, -1, -1]}, {},
     "y_train has negative labels -1 (3 images, first at index 17); -1 marks unlabelled images: "
     "set labels=false to train without labels, or label every image"),
    ({"y_train": np.r_[Y[:-1], -4]}, {},
     "y_train has negative labels -4 (1 image, first at index 19); labels are class indices"),
    ({"y_train": Y.astype(np.float32)}, {},
     "y_train must hold integer class indices, got float32 (first values: 0.0, 1.0, 2.0, 3.0, 4.0); "
     "store y.astype(np.int64)"),
    ({"y_train": np.r_[Y[:-1], 12]}, {"num_classes": 10},
     "y_train has labels outside 0..9 (num_classes=10): 12 (1 image, first at index 19)"),
    ({"y_train": np.r_[Y[:-1], 10], "classes": np.array(list("abcdefghij"))}, {},
     "y_train has labels outside 0..9 (the file's 'classes' array (10 names)): 10 (1 image, first at index 19)"),
    ({"y_train": np.eye(10)[Y]}, {},
     "y_train must hold one class index per image, shape (N,), got shape (20, 10) (one-hot?"),
    ({"x_train": _images(0), "y_train": Y[:0]}, {}, "x_train is empty (shape (0, 6, 6)); it needs at least one image"),
    ({"y_train": Y[:5]}, {}, "x_train has 20 images but y_train has 5 labels"),
    ({"x_train": _images(20, (6, 6, 5))}, {},
     "x_train has shape (20, 6, 6, 5): expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3"),
    ({"x_train": _images(20, (1, 6, 8))}, {}, "x_train: images must be square, got 6x8 (shape (20, 1, 6, 8))"),
    ({"x_train": _images(20).astype(np.float32)}, {}, "x_train must be uint8 0..255, got float32; scale floats"),
])
def test_bad_arrays_name_the_file_the_array_and_the_values(tmp_path, arrays, kwargs, message):
    path = _write(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as err:  # the file is at fault, not the recipe: "data error:" on the CLI
        npz(path, **kwargs)
    assert str(err.value).startswith(f"npz {tmp_path / 'bad.npz'}: ")
    assert message in str(err.value)


def test_labels_false_reads_no_labels(tmp_path: Path):
    np.savez(tmp_path / "x.npz", x_train=_images(4))  # no y arrays at all
    with pytest.raises(DataError) as err:
        npz(str(tmp_path / "x.npz"))
    assert str(err.value) == (f"npz {tmp_path / 'x.npz'}: missing array 'y_train'; found ['x_train'] "
                              f"(set labels=false for a corpus without labels)")
    ds = npz(str(tmp_path / "x.npz"), labels=False)
    assert ds.labels().tolist() == [-1] * 4 and ds.num_classes == 0
    bad = npz(_write(tmp_path / "bad.npz", y_train=Y.astype(np.float32) - 7), labels=False)
    assert bad.labels().tolist() == [-1] * 20


@pytest.mark.parametrize(("layout", "channels"), [("NHW", 1), ("NHWC", 1), ("NHWC", 3), ("NCHW", 1), ("NCHW", 3)])
def test_channels_first_and_last_give_the_same_images(layout: str, channels: int):
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, size=(4, channels, 5, 5), dtype=np.uint8)  # (N, C, H, W)
    x = {"NHW": ref[:, 0] if channels == 1 else None, "NHWC": ref.transpose(0, 2, 3, 1), "NCHW": ref}[layout]
    np.testing.assert_array_equal(channels_first(np.ascontiguousarray(x)), ref)


def test_three_by_three_images_read_channels_last():
    x = np.arange(2 * 27, dtype=np.uint8).reshape(2, 3, 3, 3)  # both readings fit: channels-last wins
    np.testing.assert_array_equal(channels_first(x), x.transpose(0, 3, 1, 2))


def test_channels_first_npz_loads(tmp_path: Path):
    x = _images(20, (1, 6, 6))
    ds = npz(_write(tmp_path / "cf.npz", x_train=x))
    assert tuple(ds.images.shape) == (20, 1, 6, 6) and ds.images[:, 0, 0, 0].tolist() == list(range(20))


def test_not_an_npz_names_the_file(tmp_path: Path):
    for name, content in (("text.npz", b"hello, I am text"), ("zip.npz", b"PK\x03\x04garbage"), ("empty.npz", b"")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(DataError) as err:
            npz(str(tmp_path / name))
        assert str(err.value).startswith(f"npz {tmp_path / name}: not a")
        assert "allow_pickle" not in str(err.value)
    np.save(tmp_path / "one.npy", _images(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DataError, match="a single .npy array, not an .npz archive"):
        npz(str(tmp_path / "one.npz"))
    np.savez(tmp_path / "obj.npz", x_train=_images(3), y_train=np.array([{"a": 1}] * 3, dtype=object))
    with pytest.raises(DataError, match="array 'y_train' holds Python objects"):
        npz(str(tmp_path / "obj.npz"))


def test_shared_data_placeholder_and_missing_file(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BIGMODEL_SHARED_DATA", str(tmp_path))
    assert expand_path("$BIGMODEL_SHARED_DATA/m.npz") == tmp_path / "m.npz" == shared_data() / "m.npz"
    _write(tmp_path / "m.npz")
    monkeypatch.chdir("/")
    assert len(npz("$BIGMODEL_SHARED_DATA/m.npz")) == 20
    with pytest.raises(DataError) as err:
        npz("$BIGMODEL_SHARED_DATA/nope.npz")
    assert str(err.value) == (f"npz path='$BIGMODEL_SHARED_DATA/nope.npz': no such file; "
                              f"looked for {tmp_path / 'nope.npz'} "
                              f"($BIGMODEL_SHARED_DATA as set); set BIGMODEL_SHARED_DATA=/folder/with/the/data")
    monkeypatch.delenv("BIGMODEL_SHARED_DATA")
    repo = Path(__file__).resolve().parents[2]
    assert shared_data() == repo.parent / "shared" / "data"


def test_data_folders_are_searched_in_order(tmp_path: Path, monkeypatch):
    """``$BIGMODEL_DATA/<file>``: the user's folder first, then the shared one; absent everywhere,
    the user's (where ``bigmodel data get`` writes). ``$BIGMODEL_SHARED_DATA/<file>`` is the shared one."""
    mine, shared = tmp_path / "mine", tmp_path / "shared"
    monkeypatch.setenv("BIGMODEL_DATA", str(mine))
    monkeypatch.setenv("BIGMODEL_SHARED_DATA", str(shared))
    shared.mkdir()
    _write(shared / "m.npz", x_train=_images(20) + 100)
    for written in ("$BIGMODEL_DATA/m.npz", "${BIGMODEL_DATA}/m.npz"):
        assert expand_path(written) == shared / "m.npz"
    assert npz("$BIGMODEL_DATA/m.npz").images[0, 0, 0, 0] == 100
    mine.mkdir()
    _write(mine / "m.npz")
    assert expand_path("$BIGMODEL_DATA/m.npz") == mine / "m.npz" and npz("$BIGMODEL_DATA/m.npz").images[0, 0, 0, 0] == 0
    assert expand_path("$BIGMODEL_SHARED_DATA/m.npz") == shared / "m.npz"
    assert expand_path("$BIGMODEL_DATA/nope.npz") == mine / "nope.npz" and expand_path("$BIGMODEL_DATA") == mine


def test_user_data_folder_default(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("BIGMODEL_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert user_data() == tmp_path / "cache" / "bigmodel"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_data() == tmp_path / "home" / ".cache" / "bigmodel"


def test_a_file_in_no_data_folder_says_how_to_get_it(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("BIGMODEL_DATA", str(tmp_path / "a"))
    monkeypatch.setenv("BIGMODEL_SHARED_DATA", str(tmp_path / "b"))
    folders = f"($BIGMODEL_DATA={tmp_path / 'a'}, $BIGMODEL_SHARED_DATA={tmp_path / 'b'})"
    with pytest.raises(DataError) as err:
        npz("$BIGMODEL_DATA/cifar100.npz")
    assert str(err.value) == (f"npz path='$BIGMODEL_DATA/cifar100.npz': cifar100.npz is in no data folder {folders}; "
                              f"get it with: bigmodel data get cifar100")
    with pytest.raises(DataError) as err:
        npz("$BIGMODEL_DATA/mine.npz")
    assert str(err.value) == (f"npz path='$BIGMODEL_DATA/mine.npz': mine.npz is in no data folder {folders}; "
                              f"put it in {tmp_path / 'a'}, or set BIGMODEL_DATA to the folder that has it")


def test_a_zoo_recipe_without_its_data_prints_the_get_command(tmp_path: Path, monkeypatch, capsys):
    """``bigmodel run simclr-resnet run.tiny=true`` with mnist.npz in neither folder: exactly one
    line ending in the command that fetches it, exit 2, nothing written."""
    from bigmodel import cli

    monkeypatch.setenv("BIGMODEL_DATA", str(tmp_path / "a"))
    monkeypatch.setenv("BIGMODEL_SHARED_DATA", str(tmp_path / "b"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "simclr-resnet", "run.tiny=true"]) == 2
    assert capsys.readouterr().err == (
        f"data error: npz path='$BIGMODEL_DATA/mnist.npz': mnist.npz is in no data folder "
        f"($BIGMODEL_DATA={tmp_path / 'a'}, $BIGMODEL_SHARED_DATA={tmp_path / 'b'}); "
        f"get it with: bigmodel data get mnist\n")
    assert list(tmp_path.iterdir()) == []


def test_a_zoo_recipe_builds_its_data_from_any_directory(mnist_npz: Path, tmp_path: Path, monkeypatch):
    """``bigmodel run supervised-vit run.tiny=true`` from another cwd finds ``$BIGMODEL_DATA/mnist.npz``
    in the shared folder when the user's folder does not have it."""
    from bigmodel.recipe import resolve
    from bigmodel.train import build

    monkeypatch.setenv("BIGMODEL_DATA", str(tmp_path / "empty"))
    monkeypatch.setenv("BIGMODEL_SHARED_DATA", str(mnist_npz.parent))
    monkeypatch.chdir(tmp_path)
    recipe = resolve("supervised-vit", ["run.tiny=true"])
    assert recipe.data.kwargs["path"] == "$BIGMODEL_DATA/mnist.npz"  # kept as written: the run stays portable
    data, model = build.experiment(recipe)
    with np.load(mnist_npz) as arrays:
        x, y = arrays["x_train"][:256], arrays["y_train"][:256]
    assert torch.equal(data.images[:, 0], torch.from_numpy(x)) and data.labels().tolist() == y.tolist()
    assert data.num_classes == model.head.out_features == 10
    test = build.dataset(recipe.transfer[0].task, "test")
    assert len(test) == 300 and test.num_classes == 10


def test_a_suite_keeps_data_paths_for_the_folder_search(tmp_path: Path, monkeypatch):
    """Suites leave ``$BIGMODEL_DATA/<file>`` to be found when the task is built (not expanded to the
    first folder on loading); ``$BIGMODEL_SHARED_DATA`` is expanded as before."""
    from bigmodel.transfer import suites

    monkeypatch.setenv("BIGMODEL_DATA", "/mine")
    monkeypatch.setenv("BIGMODEL_SHARED_DATA", "/shared")
    suite = tmp_path / "s.yaml"
    suite.write_text("transfer:\n  - {task: {name: npz, path: $BIGMODEL_DATA/m.npz}, protocol: linear}\n"
                     "  - {task: {name: npz, path: $BIGMODEL_SHARED_DATA/m.npz}, protocol: knn}\n")
    assert [e["task"]["path"] for e in suites.load_suite(suite)] == ["$BIGMODEL_DATA/m.npz", "/shared/m.npz"]
    for name, file in (("mnist", "mnist.npz"), ("cifar10", "cifar10.npz")):
        assert {e["task"]["path"] for e in suites.load_suite(name)} == {f"$BIGMODEL_DATA/{file}"}
