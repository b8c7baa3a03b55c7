"""torchvision datasets: clear errors when files are missing, no network unless asked, and loading a
tiny fake MNIST written in torchvision's on-disk (idx) format."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel.data import torchvision_sets as tv
from bigmodel.registry import DATASETS

NAMES = ["mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "stl10"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dataset touched the network without download=true")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _idx(path: Path, array: np.ndarray) -> None:
    """An idx (SN3 pascalvincent) file: magic (0, 0, dtype 0x08 = uint8, ndim), big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fake_mnist(root: Path, folder: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = {}
    for split, prefix, n in (("train", "train", 6), ("test", "t10k", 4)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        _idx(root / folder / "raw" / f"{prefix}-images-idx3-ubyte", x)
        _idx(root / folder / "raw" / f"{prefix}-labels-idx1-ubyte", y)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_missing_files_say_where_they_must_go(name: str, tmp_path: Path):
    with pytest.raises(FileNotFoundError) as err:
        DATASETS.build(name, root=str(tmp_path), split="train")
    msg = str(err.value)
    assert str(tmp_path) in msg and "data.download=true" in msg
    expected = {"mnist": "MNIST/raw/train-images-idx3-ubyte",
                "fashion_mnist": "FashionMNIST/raw/t10k-labels-idx1-ubyte",
                "cifar10": "cifar-10-batches-py/data_batch_1", "cifar100": "cifar-100-python/train",
                "svhn": "train_32x32.mat", "stl10": "stl10_binary/train_X.bin"}[name]
    assert str(tmp_path / expected) in msg


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_loads_a_fake_on_disk_mnist(name: str, folder: str, tmp_path: Path):
    fake = _fake_mnist(tmp_path, folder)
    for split in ("train", "test"):
        ds = DATASETS.build(name, root=str(tmp_path), split=split)
        x, y = fake[split]
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(x), 1, 28, 28)
        assert torch.equal(ds.images[:, 0], torch.from_numpy(x))
        assert ds.labels().tolist() == y.tolist()
        assert ds.num_classes == 10 and len(ds.classes) == 10


def test_corrupt_files_are_named(tmp_path: Path):
    """CIFAR's files are md5-checked by torchvision: present but wrong files get their own message."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"junk")
    with pytest.raises(ValueError, match="checksum"):
        tv.cifar10(root=str(tmp_path))


def test_default_root_and_download_default_off():
    assert tv.DEFAULT_ROOT == "$BIGMODEL_DATA/raw"
    for name in NAMES:
        fields = DATASETS.config_model(name).model_fields
        assert fields["download"].default is False and fields["root"].default == tv.DEFAULT_ROOT


def test_default_root_is_the_raw_folder_data_get_fills(tmp_path: Path, monkeypatch):
    """With no root, the files are read from ``$BIGMODEL_DATA/raw`` (``bigmodel data get``'s raw
    folder), else from the shared data folder's ``raw``."""
    monkeypatch.setenv("BIGMODEL_DATA", str(tmp_path / "mine"))
    monkeypatch.setenv("BIGMODEL_SHARED_DATA", str(tmp_path / "shared"))
    shared = _fake_mnist(tmp_path / "shared" / "raw", "MNIST")
    assert DATASETS.build("mnist", split="test").images[:, 0].numpy().tolist() == shared["test"][0].tolist()
    _fake_mnist(tmp_path / "mine" / "raw", "MNIST")
    mine = 255 - shared["test"][0]
    _idx(tmp_path / "mine" / "raw" / "MNIST" / "raw" / "t10k-images-idx3-ubyte", mine)
    assert DATASETS.build("mnist", split="test").images[:, 0].numpy().tolist() == mine.tolist()
