"""Dataset conventions shared by every source.

A dataset is a map-style ``torch.utils.data.Dataset`` whose items are ``(image, label)``: a
``uint8`` tensor ``(C, H, W)`` and an ``int`` class index, or ``-1`` when unlabelled. It also
carries ``num_classes`` (0 when unlabelled), ``channels`` and ``image_size`` so that objectives and
protocols can size themselves without reading a sample.

Small datasets live in memory as one uint8 tensor (:class:`TensorImages`): decode once, index
batches directly.

Data folders, searched in this order (:func:`data_folders`):

1. ``$BIGMODEL_DATA``, the user's data folder that ``bigmodel data get NAME`` fills (default
   ``${XDG_CACHE_HOME:-~/.cache}/bigmodel``);
2. ``$BIGMODEL_SHARED_DATA``, a pre-filled copy in the same layout (our machines' ``shared/data``
   beside the repository, the default).

A data path written ``$BIGMODEL_DATA/<file>`` is the first folder's ``<file>`` that exists, so a
zoo recipe naming ``$BIGMODEL_DATA/mnist.npz`` finds the file in either folder;
``$BIGMODEL_SHARED_DATA/<file>`` names the shared folder only. :func:`expand_path` expands both
(and ``~`` and other environment variables) when the dataset is built, so a recipe works from any
directory and keeps its paths as written.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

import bigmodel
from bigmodel.errors import DataError

DATA_VAR = "BIGMODEL_DATA"
SHARED_DATA_VAR = "BIGMODEL_SHARED_DATA"


class MissingData(DataError, FileNotFoundError):
    """A data file or folder that is not there: a :class:`~bigmodel.errors.DataError` (the CLI says
    ``data error:``) that callers catching ``FileNotFoundError`` still catch."""


def user_data() -> Path:
    """``$BIGMODEL_DATA``, else ``${XDG_CACHE_HOME:-~/.cache}/bigmodel``: the user's data folder."""
    if os.environ.get(DATA_VAR):
        return Path(os.environ[DATA_VAR]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "bigmodel"


def shared_data() -> Path:
    """``$BIGMODEL_SHARED_DATA``, else ``shared/data`` beside the repository holding the package."""
    if os.environ.get(SHARED_DATA_VAR):
        return Path(os.environ[SHARED_DATA_VAR]).expanduser()
    return Path(bigmodel.__file__).resolve().parents[2] / "shared" / "data"


def data_folders() -> list[tuple[str, Path]]:
    """``(variable, folder)`` of every data folder, in the order ``$BIGMODEL_DATA/<file>`` searches them."""
    return [(DATA_VAR, user_data()), (SHARED_DATA_VAR, shared_data())]


def data_file(path: str) -> str | None:
    """The ``<file>`` of a path written ``$BIGMODEL_DATA/<file>`` (or ``${BIGMODEL_DATA}/<file>``), else None."""
    for prefix in (f"${DATA_VAR}/", f"${{{DATA_VAR}}}/"):
        if path.startswith(prefix) and path[len(prefix):]:
            return path[len(prefix):]
    return None


def find_data(name: str) -> Path | None:
    """The first data folder's ``name`` that exists (see :func:`data_folders`), else None."""
    return next((folder / name for _, folder in data_folders() if (folder / name).exists()), None)


def expand_path(path: str) -> Path:
    """``path`` with its variables and ``~`` expanded: ``$BIGMODEL_DATA/<file>`` is the first data
    folder's ``<file>`` that exists (else the user's: where ``bigmodel data get`` would put it),
    ``$BIGMODEL_SHARED_DATA`` is :func:`shared_data`, ``$BIGMODEL_DATA`` alone :func:`user_data`.
    Unknown variables are left as written."""
    name = data_file(path)
    if name is not None:
        return find_data(name) or user_data() / name
    env = {**os.environ, SHARED_DATA_VAR: str(shared_data()), DATA_VAR: str(user_data())}
    return Path(string.Template(path).safe_substitute(env)).expanduser()


def missing_file_hint(path: str) -> str:
    """Where a missing data file was looked for, and how to point the data folders elsewhere. For
    ``$BIGMODEL_DATA/<file>``: ``"<file> is in no data folder ($BIGMODEL_DATA=..., $BIGMODEL_SHARED_DATA=...)"``,
    to which the caller adds how to get the file."""
    name = data_file(path)
    if name is not None:
        folders = ", ".join(f"${var}={folder}" for var, folder in data_folders())
        return f"{name} is in no data folder ({folders})"
    where = expand_path(path)
    if not where.is_absolute():
        where = Path.cwd() / where
    if f"${SHARED_DATA_VAR}" in path or f"${{{SHARED_DATA_VAR}}}" in path:
        source = "as set" if os.environ.get(SHARED_DATA_VAR) else "unset: shared/data beside the repository"
        return f"looked for {where} (${SHARED_DATA_VAR} {source}); set {SHARED_DATA_VAR}=/folder/with/the/data"
    return (f"looked for {where}; give an absolute path, or ${SHARED_DATA_VAR}/<file> for the shared data "
            f"(set {SHARED_DATA_VAR}=/folder/with/the/data)")


class ImageDataset(Dataset):
    num_classes: int
    channels: int
    image_size: int
    classes: list[str] | None = None

    def labels(self) -> torch.Tensor:
        """All labels as an int64 tensor (used for stratified sampling and probes)."""
        return torch.tensor([self[i][1] for i in range(len(self))], dtype=torch.long)


class TensorImages(ImageDataset):
    """An in-memory dataset: ``images`` uint8 ``(N, C, H, W)``, ``targets`` int64 ``(N,)``.

    ``num_classes`` is the declared count when given, else ``len(classes)`` or the largest label + 1
    (whichever is larger); 0 when every label is -1.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str] | None = None,
                 num_classes: int | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images.contiguous()
        self.targets = targets.long()
        if len(self.targets) and int(self.targets.min()) < -1:
            raise ValueError(f"labels must be class indices >= 0 (or -1: unlabelled), got {int(self.targets.min())}")
        self.channels = images.shape[1]
        self.image_size = images.shape[-1]
        labelled = self.targets[self.targets >= 0]
        self.num_classes = int(labelled.max()) + 1 if len(labelled) else 0
        if classes is not None:
            self.num_classes = max(self.num_classes, len(classes))
        if num_classes is not None:
            self.num_classes = num_classes
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])

    def labels(self) -> torch.Tensor:
        return self.targets

    def subset(self, index: torch.Tensor) -> TensorImages:
        return TensorImages(self.images[index], self.targets[index], self.classes, self.num_classes)


def channels_first(x: np.ndarray, name: str = "images") -> np.ndarray:
    """Square uint8 images as ``(N, C, H, W)``, from any of these layouts:

    - ``(N, H, W)`` grey;
    - ``(N, H, W, C)`` channels last (the layout of the shared data), C = 1 or 3;
    - ``(N, C, H, W)`` channels first, C = 1 or 3.

    A 4-D array is channels-last when its last axis is 1 or 3 and its two middle axes are equal
    (a square image), channels-first when its second axis is 1 or 3 and its last two are equal;
    when both readings fit (only 1×1 or 3×3 images) channels-last wins.

    Args:
        x: the array.
        name: how messages call it, e.g. ``"data.npz x_train"``.
    """
    if x.dtype != np.uint8:
        raise DataError(f"{name} must be uint8 0..255, got {x.dtype}"
                        + ("; scale floats in [0, 1] with (x * 255).round().astype(np.uint8)"
                            if x.dtype.kind == "f" else ""))
    expected = "expected (N, H, W), (N, H, W, C) or (N, C, H, W) with C = 1 or 3"
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        last = x.shape[3] in (1, 3) and x.shape[1] == x.shape[2]
        first = x.shape[1] in (1, 3) and x.shape[2] == x.shape[3]
        if last:
            x = x.transpose(0, 3, 1, 2)
        elif not first:
            if x.shape[3] in (1, 3):
                raise DataError(f"{name}: images must be square, got {x.shape[1]}x{x.shape[2]} (shape {x.shape})")
            if x.shape[1] in (1, 3):
                raise DataError(f"{name}: images must be square, got {x.shape[2]}x{x.shape[3]} (shape {x.shape})")
            raise DataError(f"{name} has shape {x.shape}: {expected}")
    else:
        raise DataError(f"{name} has shape {x.shape}: {expected}")
    if x.shape[-1] != x.shape[-2]:
        raise DataError(f"{name}: images must be square, got {x.shape[-2]}x{x.shape[-1]} (shape {x.shape})")
    return x


def from_numpy(x: np.ndarray, y: np.ndarray | None, classes: list[str] | None = None,
               num_classes: int | None = None, name: str = "images") -> TensorImages:
    """uint8 images in any layout :func:`channels_first` reads, with int labels (``None``: unlabelled)."""
    x = channels_first(x, name)
    targets = (torch.full((len(x),), -1, dtype=torch.long) if y is None
               else torch.from_numpy(np.asarray(y, dtype=np.int64)))
    return TensorImages(torch.from_numpy(np.ascontiguousarray(x)), targets, classes, num_classes)


def materialize(ds: ImageDataset) -> TensorImages:
    """Decode every item once into memory (for probes and small training sets)."""
    if isinstance(ds, TensorImages):
        return ds
    if isinstance(ds, IterableDataset):  # streamed (shards): one pass over every sample
        images, labels = zip(*ds, strict=True)
        return TensorImages(torch.stack(images), torch.tensor(labels, dtype=torch.long), getattr(ds, "classes", None))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return TensorImages(images, ds.labels(), getattr(ds, "classes", None))
