"""scikit-learn's bundled handwritten digits (UCI optdigits test set): 1,797 real 8x8 images.

Embedded in scikit-learn, so it needs no download: the default transfer task. Pixel values
0..16 are scaled to 0..255; the split is a fixed stratified 75/25 split.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from bigmodel.data.base import TensorImages, from_numpy
from bigmodel.registry import DATASETS


@DATASETS.register("digits")
def digits(split: Literal["train", "test"] = "train", test_fraction: float = 0.25, seed: int = 0) -> TensorImages:
    """Digits as uint8 ``(N, 1, 8, 8)``; ``split`` picks the stratified train or test part."""
    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    classes = [str(c) for c in bunch.target_names]
    return from_numpy(x_tr, y_tr, classes) if split == "train" else from_numpy(x_te, y_te, classes)
