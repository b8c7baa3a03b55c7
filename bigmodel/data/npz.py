"""Arrays in a ``.npz`` file: ``x_train, y_train, x_test, y_test`` (and optionally ``classes``).

This is the layout of the data folders (``$BIGMODEL_DATA/mnist.npz``, written by ``bigmodel data get
mnist``; the pre-filled ``$BIGMODEL_SHARED_DATA``): see :mod:`bigmodel.data.base`.

- Images are uint8 and square, ``(N, H, W)``, channels-last ``(N, H, W, C)`` or channels-first
  ``(N, C, H, W)`` with C = 1 or 3 (see :func:`bigmodel.data.base.channels_first`).
- Labels are integer class indices ``(N,)`` in ``0 … K-1``. The class count K is declared by
  ``num_classes``, else by a ``classes`` array in the file (its length), else it is the largest
  label of ``y_train`` and ``y_test`` + 1, and then every class ``0 … K-1`` must have an image in
  one of the two splits (a stray label 57 among digits is an error, not 48 empty classes).
  Negative labels, floats and labels ≥ K are errors that name the file, the array and the bad
  values. With ``labels: false`` no label array is read (a self-supervised corpus).

Files are opened with ``allow_pickle=False``: an archive of Python objects is refused.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from bigmodel.data.base import TensorImages, expand_path, from_numpy
from bigmodel.data.download import missing_hint
from bigmodel.errors import DataError
from bigmodel.registry import DATASETS

SPLITS = ("train", "test")


@DATASETS.register("npz")
def npz(
    path: str,
    split: Literal["train", "test"] = "train",
    limit: Annotated[int, Field(ge=1)] | None = None,
    labels: bool = True,
    num_classes: Annotated[int, Field(ge=1)] | None = None,
) -> TensorImages:
    """Load one split of an npz archive.

    Args:
        path: the ``.npz`` file; ``$BIGMODEL_DATA/<file>`` is found in the data folders,
            ``$BIGMODEL_SHARED_DATA`` names the shared one.
        limit: keep only the first ``limit`` images of the split (a fixed, reproducible subset).
        labels: ``False`` ignores the labels (a self-supervised corpus); they are not read.
        num_classes: the class count K, when some classes have no image in the file.
    """
    file = expand_path(path)
    if not file.is_file():
        raise DataError(f"npz path={path!r}: {missing_hint(path)}")
    with _open(file) as arrays:
        x = _read(arrays, file, f"x_{split}")
        y = classes = None
        if labels:
            y = _read(arrays, file, f"y_{split}")
            every = {k: _label_array(file, k, _read(arrays, file, k))
                     for k in (f"y_{s}" for s in SPLITS) if k in arrays.files}
            classes = [str(c) for c in _read(arrays, file, "classes")] if "classes" in arrays.files else None
    if len(x) == 0:
        raise DataError(f"npz {file}: x_{split} is empty (shape {x.shape}); it needs at least one image")
    if y is not None:
        if len(y) != len(x):
            raise DataError(f"npz {file}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
        k = _class_count(file, every, classes, num_classes)
        y = every[f"y_{split}"]
    else:
        k = None
    if limit is not None:
        x = x[:limit]
        y = None if y is None else y[:limit]
    return from_numpy(x, y, classes, k, name=f"npz {file}: x_{split}")


class _open:
    """``np.load`` of an ``.npz`` archive as a context manager, with errors that name the file."""

    def __init__(self, file: Path):
        self.file = file

    def __enter__(self) -> np.lib.npyio.NpzFile:
        try:
            self.arrays = np.load(self.file, allow_pickle=False)
        except ValueError as e:  # a file that is neither .npy nor .npz: numpy falls back to pickle
            raise DataError(f"npz {self.file}: not an .npz archive (numpy reads it as pickled data, which is "
                            f"never loaded); write it with np.savez(file, x_train=..., y_train=..., ...)") from e
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise DataError(f"npz {self.file}: not a readable .npz archive ({type(e).__name__}: {e}); "
                            f"write it with np.savez(file, x_train=..., y_train=..., ...)") from e
        if not isinstance(self.arrays, np.lib.npyio.NpzFile):
            raise DataError(f"npz {self.file}: a single .npy array, not an .npz archive of "
                            f"x_train, y_train, x_test, y_test; write it with np.savez")
        return self.arrays

    def __exit__(self, *exc: object) -> None:
        self.arrays.close()


def _read(arrays: np.lib.npyio.NpzFile, file: Path, key: str) -> np.ndarray:
    if key not in arrays.files:
        raise DataError(f"npz {file}: missing array {key!r}; found {sorted(arrays.files)}"
                        + (" (set labels=false for a corpus without labels)" if key.startswith("y_") else ""))
    try:
        return arrays[key]
    except ValueError as e:  # an object array: pickled Python objects
        raise DataError(f"npz {file}: array {key!r} holds Python objects (pickled), which are never loaded; "
                        f"store it as a plain numeric or string array") from e


def _label_array(file: Path, key: str, y: np.ndarray) -> np.ndarray:
    """``y`` as int64 ``(N,)`` after checking it holds non-negative integers."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"npz {file}: {key} must hold one class index per image, shape (N,), got shape {y.shape}"
                        + (" (one-hot? store y.argmax(1))" if y.ndim == 2 else ""))
    if y.dtype.kind not in "iu":
        raise DataError(f"npz {file}: {key} must hold integer class indices, got {y.dtype} "
                        f"(first values: {_values(y[:5].tolist())}); store y.astype(np.int64)")
    y = y.astype(np.int64)
    neg = np.flatnonzero(y < 0)
    if len(neg):
        hint = ("-1 marks unlabelled images: set labels=false to train without labels, or label every image"
                if (y[neg] == -1).all() else "labels are class indices 0 … K-1")
        raise DataError(f"npz {file}: {key} has negative labels {_bad(y, neg)}; {hint}")
    return y


def _class_count(file: Path, every: dict[str, np.ndarray], classes: list[str] | None,
                 declared: int | None) -> int:
    """The class count K (see the module docstring), after checking every label against it."""
    if declared is not None and classes is not None and declared != len(classes):
        raise ValueError(f"npz {file}: num_classes={declared} but the file's 'classes' array names {len(classes)}")
    k = declared if declared is not None else len(classes) if classes is not None else None
    if k is not None:
        source = f"num_classes={k}" if declared is not None else f"the file's 'classes' array ({k} names)"
        for key, y in every.items():
            out = np.flatnonzero(y >= k)
            if len(out):
                raise DataError(f"npz {file}: {key} has labels outside 0..{k - 1} ({source}): {_bad(y, out)}")
        return k
    used = np.unique(np.concatenate(list(every.values())))
    k = int(used[-1]) + 1 if len(used) else 0
    if len(used) < k:
        gap = int(np.setdiff1d(np.arange(k), used)[0])  # the first class no image has
        key, y = next((key, y) for key, y in every.items() if (y > gap).any())
        raise DataError(f"npz {file}: {key} has labels {_bad(y, np.flatnonzero(y > gap))} but no image of "
                        f"class {gap} ({k - len(used)} of classes 0..{k - 1} are empty); fix the labels, "
                        f"or declare the class count with num_classes={k}")
    return k


def _bad(y: np.ndarray, where: np.ndarray) -> str:
    """The distinct bad values (first few), how many images have them and the first index."""
    n = len(where)
    return f"{_values(np.unique(y[where]).tolist())} ({n} image{'s' * (n != 1)}, first at index {int(where[0])})"


def _values(values: list) -> str:
    return ", ".join(str(v) for v in values[:5]) + (f", … ({len(values)} values)" if len(values) > 5 else "")
