"""torchvision's classic datasets from a local root: ``mnist``, ``fashion_mnist``, ``cifar10``,
``cifar100``, ``svhn``, ``stl10``.

The files are read where torchvision keeps them under ``root`` (default ``$BIGMODEL_DATA/raw``, the
raw folder ``bigmodel data get NAME`` fills: see :mod:`bigmodel.data.download`). Nothing touches the
network unless the recipe says ``download: true``; when files are missing the error lists each one
with the path it must have.
The arrays are taken out of torchvision's dataset object once (decode once) and served as
:class:`TensorImages`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from torchvision import datasets as tvd

from bigmodel.data.base import MissingData, TensorImages, expand_path, from_numpy
from bigmodel.errors import DataError
from bigmodel.registry import DATASETS

DEFAULT_ROOT = "$BIGMODEL_DATA/raw"  # expanded when built: the first data folder with raw/, else the user's


def _mnist_files(cls: type[tvd.MNIST]) -> tuple[list[str], str]:
    names = [os.path.splitext(os.path.basename(url))[0] for url, _ in cls.resources]
    source = ", ".join(cls.mirrors[0] + os.path.basename(url) for url, _ in cls.resources)
    return [f"{cls.__name__}/raw/{n}" for n in names], f"the four idx files (gunzipped) from {source}"


def _cifar_files(cls: type[tvd.CIFAR10]) -> tuple[list[str], str]:
    names = [n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [f"{cls.base_folder}/{n}" for n in names], f"{cls.url} extracted into the root"


def _svhn_files(splits: list[str]) -> tuple[list[str], str]:
    entries = [tvd.SVHN.split_list[s] for s in splits]
    return [name for _, name, _ in entries], ", ".join(url for url, _, _ in entries)


def _stl10_files() -> tuple[list[str], str]:
    names = [n for n, _ in tvd.STL10.train_list + tvd.STL10.test_list]
    return [f"{tvd.STL10.base_folder}/{n}" for n in names], f"{tvd.STL10.url} extracted into the root"


def _load(name: str, root: str, download: bool, files: tuple[list[str], str],
          make: Callable[[str, bool], object]) -> object:
    """Check the files (unless downloading), then build torchvision's dataset with clear errors."""
    base = expand_path(root)
    required, source = files
    if not download:
        missing = [f for f in required if not (base / f).is_file()]
        if missing:
            raise MissingData(
                f"{name}: {len(missing)} of {len(required)} files missing under {base}: "
                + ", ".join(str(base / f) for f in missing)
                + f". Put them there ({source}), or set data.download=true to fetch them when a network is available "
                  f"(data.root={root!r} chooses the folder).")
    try:
        return make(str(base), download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" (md5 check) or a failed download
        what = "downloading failed" if download else "the files are there but torchvision rejected them (checksum)"
        raise DataError(f"{name} under {base}: {what}: {e}. Expected files: "
                        + ", ".join(str(base / f) for f in required)) from e
    except OSError as e:  # network errors during download=true
        raise DataError(f"{name}: downloading into {base} failed ({e}); without a network, put the files there: "
                        + ", ".join(str(base / f) for f in required)) from e


def _mnist_like(cls: type[tvd.MNIST], name: str, root: str, split: str, download: bool) -> TensorImages:
    ds = _load(name, root, download, _mnist_files(cls),
               lambda r, d: cls(r, train=split == "train", download=d))
    return TensorImages(ds.data[:, None].contiguous(), ds.targets.long(), list(ds.classes))


def _cifar(cls: type[tvd.CIFAR10], name: str, root: str, split: str, download: bool) -> TensorImages:
    ds = _load(name, root, download, _cifar_files(cls),
               lambda r, d: cls(r, train=split == "train", download=d))
    return from_numpy(ds.data, np.asarray(ds.targets), list(ds.classes))


@DATASETS.register("mnist")
def mnist(root: str = DEFAULT_ROOT, split: Literal["train", "test"] = "train", download: bool = False) -> TensorImages:
    """MNIST, ``(N, 1, 28, 28)``, from ``root/MNIST/raw/``."""
    return _mnist_like(tvd.MNIST, "mnist", root, split, download)


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: str = DEFAULT_ROOT, split: Literal["train", "test"] = "train",
                  download: bool = False) -> TensorImages:
    """Fashion-MNIST, ``(N, 1, 28, 28)``, from ``root/FashionMNIST/raw/``."""
    return _mnist_like(tvd.FashionMNIST, "fashion_mnist", root, split, download)


@DATASETS.register("cifar10")
def cifar10(root: str = DEFAULT_ROOT, split: Literal["train", "test"] = "train",
            download: bool = False) -> TensorImages:
    """CIFAR-10, ``(N, 3, 32, 32)``, from ``root/cifar-10-batches-py/``."""
    return _cifar(tvd.CIFAR10, "cifar10", root, split, download)


@DATASETS.register("cifar100")
def cifar100(root: str = DEFAULT_ROOT, split: Literal["train", "test"] = "train",
             download: bool = False) -> TensorImages:
    """CIFAR-100 (fine labels), ``(N, 3, 32, 32)``, from ``root/cifar-100-python/``."""
    return _cifar(tvd.CIFAR100, "cifar100", root, split, download)


@DATASETS.register("svhn")
def svhn(root: str = DEFAULT_ROOT, split: Literal["train", "test"] = "train", download: bool = False,
         extra: bool = False) -> TensorImages:
    """SVHN cropped digits, ``(N, 3, 32, 32)``, from ``root/{train,test,extra}_32x32.mat``.

    Args:
        extra: add the 531,131 "extra" images to the train split.
    """
    parts = [split] + (["extra"] if extra and split == "train" else [])
    images, labels = [], []
    for part in parts:
        ds = _load("svhn", root, download, _svhn_files([part]), lambda r, d, p=part: tvd.SVHN(r, split=p, download=d))
        images.append(torch.from_numpy(ds.data))
        labels.append(torch.from_numpy(ds.labels.astype(np.int64)))
    return TensorImages(torch.cat(images), torch.cat(labels), [str(i) for i in range(10)])


@DATASETS.register("stl10")
def stl10(root: str = DEFAULT_ROOT, split: Literal["train", "test"] = "train", download: bool = False,
          unlabeled: bool = False) -> TensorImages:
    """STL-10, ``(N, 3, 96, 96)``, from ``root/stl10_binary/``.

    Args:
        unlabeled: add the 100,000 unlabelled images (label -1) to the train split, the corpus
            STL-10 was made for.
    """
    part = "train+unlabeled" if unlabeled and split == "train" else split
    ds = _load("stl10", root, download, _stl10_files(), lambda r, d: tvd.STL10(r, split=part, download=d))
    classes = list(ds.classes) if getattr(ds, "classes", None) else None
    return TensorImages(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64)), classes)
