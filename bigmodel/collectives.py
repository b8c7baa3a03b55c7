"""The collective operations an objective needs to see the global batch of a data-parallel run
(DESIGN.md §7): the world size, an all-gather and an all-reduce that carry gradients, and the
switch that says whether a forward pass is a data-parallel training step.

They live below the objectives and the engine alike: a contrastive loss (SimCLR's NT-Xent over
every rank's embeddings, its projector's batch statistics) calls them, and the engine
(:mod:`bigmodel.train.distributed`, which re-exports them) opens :func:`data_parallel` around its
steps. In one process, or outside a training step, they are the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

_active = False  # inside a data-parallel training step (see data_parallel)


def world() -> int:
    """Processes training together: the group's size when one is joined, else 1. (The launcher's
    ``WORLD_SIZE`` alone does not make a run distributed: a process group must have been joined.)"""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextlib.contextmanager
def data_parallel(world_: int) -> Iterator[None]:
    """Mark the training steps of a run of ``world_`` processes: inside, :func:`gather` and
    :func:`all_reduce_sum` communicate. Outside (an analysis forward on rank 0 after training,
    a fine-tune) they are the identity, so no rank waits for a collective the others never call."""
    global _active
    before, _active = _active, world_ > 1 and world() > 1
    try:
        yield
    finally:
        _active = before


def gathering() -> bool:
    """Whether this forward pass is a step of a data-parallel run (inside :func:`data_parallel`)."""
    return _active


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's gradient with respect to every row, summed
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def gather(x: torch.Tensor) -> torch.Tensor:
    """``x`` of every rank, concatenated in rank order along dim 0, differentiable: the backward
    pass gives each rank the sum over the ranks of the gradients with respect to its rows. Every
    rank's loss is then the global loss, each rank's parameter gradient ``world`` times its share
    of the global gradient, and their DDP (or FSDP2) average the global gradient."""
    return _Gather.apply(x) if _active else x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over the ranks, differentiable (gradients are summed back alike)."""
    return _AllReduce.apply(x) if _active else x
