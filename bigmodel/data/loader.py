"""Deterministic, resumable batches.

Step ``s`` of a run reads samples ``s·B … (s+1)·B − 1`` of an endless stream made of one random
permutation of the dataset per epoch, each seeded by ``(seed, epoch)``. The data position is
therefore just the step number: a resumed run reads exactly the batches the uninterrupted run
would have, with no sampler state to save.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from bigmodel.data.base import ImageDataset, TensorImages


class StepSampler(Sampler[list[int]]):
    """Index batches for steps ``start, start + 1, …, stop − 1``."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, stop: int | None = None):
        if n == 0:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:  # a batch spans at most a few epochs
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = step * self.batch_size + torch.arange(self.batch_size)
        epochs = pos // self.n
        out = torch.empty_like(pos)
        for e in epochs.unique().tolist():
            mask = epochs == e
            out[mask] = self._perm(e)[pos[mask] % self.n]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start
        while self.stop is None or step < self.stop:
            yield self.indices(step).tolist()
            step += 1

    def __len__(self) -> int:
        return (self.stop - self.start) if self.stop is not None else 2**62


def batches(dataset: ImageDataset, batch_size: int, seed: int, start: int = 0, stop: int | None = None,
            num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images uint8 (B, C, H, W), labels (B,))`` for each step in ``[start, stop)``."""
    sampler = StepSampler(len(dataset), batch_size, seed, start, stop)
    if isinstance(dataset, TensorImages):  # in memory: index the tensors directly
        for idx in sampler:
            idx = torch.tensor(idx)
            yield dataset.images[idx], dataset.targets[idx]
        return
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    for images, labels in loader:
        yield images, labels
