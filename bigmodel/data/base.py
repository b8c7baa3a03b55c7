"""Dataset conventions shared by every source.

A dataset is a map-style ``torch.utils.data.Dataset`` whose items are ``(image, label)``: a
``uint8`` tensor ``(C, H, W)`` and an ``int`` class index, or ``-1`` when unlabelled. It also
carries ``num_classes`` (0 when unlabelled), ``channels`` and ``image_size`` so that objectives and
protocols can size themselves without reading a sample.

Small datasets live in memory as one uint8 tensor (:class:`TensorImages`): decode once, index
batches directly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset


class ImageDataset(Dataset):
    num_classes: int
    channels: int
    image_size: int
    classes: list[str] | None = None

    def labels(self) -> torch.Tensor:
        """All labels as an int64 tensor (used for stratified sampling and probes)."""
        return torch.tensor([self[i][1] for i in range(len(self))], dtype=torch.long)


class TensorImages(ImageDataset):
    """An in-memory dataset: ``images`` uint8 ``(N, C, H, W)``, ``targets`` int64 ``(N,)``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str] | None = None):
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} labels")
        self.images = images.contiguous()
        self.targets = targets.long()
        self.channels = images.shape[1]
        self.image_size = images.shape[-1]
        labelled = self.targets[self.targets >= 0]
        self.num_classes = int(labelled.max()) + 1 if len(labelled) else 0
        if classes is not None:
            self.num_classes = max(self.num_classes, len(classes))
        self.classes = classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.targets[i])

    def labels(self) -> torch.Tensor:
        return self.targets

    def subset(self, index: torch.Tensor) -> TensorImages:
        return TensorImages(self.images[index], self.targets[index], self.classes)


def from_numpy(x: np.ndarray, y: np.ndarray | None, classes: list[str] | None = None) -> TensorImages:
    """Images ``(N, H, W)`` or ``(N, H, W, C)`` uint8 (channels last, as in ../shared/data)."""
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8 0..255, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)
    else:
        raise ValueError(f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"images must be square, got {x.shape[-2]}x{x.shape[-1]}")
    targets = torch.full((len(x),), -1, dtype=torch.long) if y is None else torch.from_numpy(np.asarray(y, dtype=np.int64))
    return TensorImages(torch.from_numpy(np.ascontiguousarray(x)), targets, classes)


def materialize(ds: ImageDataset) -> TensorImages:
    """Decode every item once into memory (for probes and small training sets)."""
    if isinstance(ds, TensorImages):
        return ds
    if isinstance(ds, IterableDataset):  # streamed (shards): one pass over every sample
        images, labels = zip(*ds, strict=True)
        return TensorImages(torch.stack(images), torch.tensor(labels, dtype=torch.long), getattr(ds, "classes", None))
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    return TensorImages(images, ds.labels(), getattr(ds, "classes", None))
