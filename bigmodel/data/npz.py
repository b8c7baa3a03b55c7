"""Arrays in a ``.npz`` file: ``x_train, y_train, x_test, y_test`` (and optionally ``classes``).

This is the layout of ../shared/data (mnist.npz, cifar10.npz). Images are uint8, ``(N, H, W)`` or
channels-last ``(N, H, W, C)``; labels are class indices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from bigmodel.data.base import TensorImages, from_numpy
from bigmodel.registry import DATASETS


@DATASETS.register("npz")
def npz(
    path: str,
    split: Literal["train", "test"] = "train",
    limit: Annotated[int, Field(ge=1)] | None = None,
    labels: bool = True,
) -> TensorImages:
    """Load one split of an npz archive.

    Args:
        path: the ``.npz`` file.
        limit: keep only the first ``limit`` images of the split (a fixed, reproducible subset).
        labels: ``False`` drops the labels (a self-supervised corpus).
    """
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data.path={path!r}: no such file (expected an .npz with x_train, y_train, x_test, y_test)")
    with np.load(file, allow_pickle=False) as arrays:
        missing = [k for k in (f"x_{split}", f"y_{split}") if k not in arrays]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}; found {sorted(arrays.files)}")
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else None
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return from_numpy(x, y if labels else None, classes if labels else None)
