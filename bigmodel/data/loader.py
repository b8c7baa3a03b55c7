"""Deterministic, resumable batches.

Step ``s`` of a run reads samples ``s·B … (s+1)·B − 1`` of an endless stream made of one random
permutation of the dataset per epoch, each seeded by ``(seed, epoch)``. The data position is
therefore just the step number: a resumed run reads exactly the batches the uninterrupted run
would have, with no sampler state to save.

Several processes (DESIGN.md §7) share this one global batch: the batch of a step does not depend
on the number of processes, and rank ``r`` of ``world`` reads only its rows of it
(:func:`rank_rows`: its ``1/world`` share of each of the ``accum_steps`` micro-batches, so that a
micro-batch gathered over the ranks is the micro-batch of one process). The position stays the
step, whatever the process count: a run may resume on another number of processes.

Streamed datasets (``shards``) keep the same contract: they implement
``step_batches(steps, batch_size, seed, rank, world, accum_steps)``, this rank's rows of the batches
of any increasing run of steps, and :func:`batches` deals the steps to DataLoader workers in the
round-robin order the DataLoader collects them (worker ``w`` serves steps ``start + w``,
``start + w + workers``, …).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from itertools import count

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler, get_worker_info

from bigmodel.data.base import ImageDataset, TensorImages


class StepSampler(Sampler[list[int]]):
    """Index batches for steps ``start, start + 1, …, stop − 1``."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, stop: int | None = None,
                 rows: torch.Tensor | None = None):
        if n == 0:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop
        self.rows = rows  # this rank's rows of each batch (None: all)
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
            idx = self.indices(step)
            yield (idx if self.rows is None else idx[self.rows]).tolist()
            step += 1

    def __len__(self) -> int:
        return (self.stop - self.start) if self.stop is not None else 2**62


def rank_rows(batch_size: int, accum_steps: int = 1, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The rows of a global batch that rank ``rank`` of ``world`` trains on, in order: its
    ``1/world`` share of each of the ``accum_steps`` micro-batches, so that its ``j``-th
    micro-batch (``chunk(accum_steps)[j]`` of its rows) is its share of the global ``j``-th.

    Raises:
        ValueError: ``batch_size`` is not divisible by ``world · accum_steps``.
    """
    if batch_size % (world * accum_steps):
        raise ValueError(f"optim.batch_size = {batch_size} is not divisible by the {world} processes × "
                         f"optim.accum_steps = {accum_steps}; choose a multiple of {world * accum_steps}")
    micro = batch_size // accum_steps
    share = micro // world
    return (torch.arange(accum_steps)[:, None] * micro + rank * share + torch.arange(share)).flatten()


def batches(dataset: ImageDataset, batch_size: int, seed: int, start: int = 0, stop: int | None = None,
            num_workers: int = 0, rank: int = 0, world: int = 1,
            accum_steps: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images uint8 (b, C, H, W), labels (b,))`` for each step in ``[start, stop)``: the rows
    :func:`rank_rows` gives rank ``rank`` of ``world`` of the global batch of ``batch_size``
    (``b = batch_size / world``; all of it in one process)."""
    if hasattr(dataset, "step_batches"):
        yield from _streamed(dataset, batch_size, seed, start, stop, num_workers, rank, world, accum_steps)
        return
    rows = rank_rows(batch_size, accum_steps, rank, world) if world > 1 else None
    sampler = StepSampler(len(dataset), batch_size, seed, start, stop, rows)
    if isinstance(dataset, TensorImages):  # in memory: index the tensors directly
        for idx in sampler:
            idx = torch.tensor(idx)
            yield dataset.images[idx], dataset.targets[idx]
        return
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    yield from loader


class _Steps(IterableDataset):
    """Steps ``[start, stop)`` of a streamed dataset, split across DataLoader workers."""

    def __init__(self, dataset, batch_size: int, seed: int, start: int, stop: int | None, workers: int,
                 rank: int = 0, world: int = 1, accum_steps: int = 1):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.start, self.stop, self.workers, self.rank, self.world = start, stop, workers, rank, world
        self.accum_steps = accum_steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        w, step = (info.id if info else 0), max(1, self.workers)
        steps = count(self.start + w, step)
        if self.stop is not None:
            steps = range(self.start + w, self.stop, step)
        yield from self.dataset.step_batches(steps, self.batch_size, self.seed, self.rank, self.world,
                                             self.accum_steps)


def _streamed(dataset, batch_size: int, seed: int, start: int, stop: int | None, num_workers: int,
              rank: int, world: int, accum_steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    workers = dataset.workers_for(num_workers) if num_workers else 0
    steps = _Steps(dataset, batch_size, seed, start, stop, workers, rank, world, accum_steps)
    if workers == 0:
        yield from steps
        return
    yield from DataLoader(steps, batch_size=None, num_workers=workers)


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size: torch.distributed when initialised, else the
    ``RANK``/``WORLD_SIZE`` environment variables (set by torchrun), else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
