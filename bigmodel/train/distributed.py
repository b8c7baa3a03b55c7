"""Several processes training one model on torch.distributed (DESIGN.md §7, STYLE.md 16).

A launcher (``torchrun``, or SLURM's ``srun`` with the same variables) starts one process per
device and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init` then joins the process group (NCCL on GPUs, gloo on CPUs) and :func:`cleanup` leaves
it. One process without those variables is an ordinary run: every helper here is then a no-op.

How a data-parallel run stays the run of one process:

- the global batch is the same for any process count; rank ``r`` takes its rows of it
  (:func:`bigmodel.data.loader.rank_rows`), and its views are drawn as one process draws them
  (:func:`rank_views`);
- gradients are averaged across ranks (DDP, or FSDP2's reduce-scatter), after the last of the
  ``accum_steps`` micro-batches only (:func:`grad_sync`);
- contrastive objectives see the global batch (:func:`~bigmodel.collectives.gather`,
  :func:`~bigmodel.collectives.all_reduce_sum`, both with gradients, in :mod:`bigmodel.collectives`
  below the objectives), inside a training step only (:func:`~bigmodel.collectives.data_parallel`);
- the ranks agree after every step on the mean scalars and on whether to stop (:func:`agree`);
- only rank 0 writes logs, metrics and checkpoint metadata (:func:`is_main`).

:func:`wrap` applies what the recipe's ``run`` section asks to the model — activation
checkpointing, ``torch.compile``, then DDP or FSDP2 — and :func:`unwrap` takes it off again after
training, so that transfer and analysis see the plain objective with the trained weights.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigmodel.collectives import (  # noqa: F401  (re-exported: the engine's side of the collectives)
    all_reduce_sum,
    data_parallel,
    gather,
    gathering,
    world,
)
from bigmodel.data.loader import rank_rows, rank_world
from bigmodel.errors import RecipeError

COMPILE_BACKEND = "inductor"  # torch.compile's backend for run.compile=true


# ---------------------------------------------------------------------------------------------
# The process group


def init(timeout_s: float = 1800) -> bool:
    """Join the process group when launched with ``WORLD_SIZE > 1`` (NCCL when this process has a
    GPU, gloo otherwise; the GPU is ``LOCAL_RANK``). Returns whether a group was created here."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def cleanup() -> None:
    """Leave the process group, if this process is in one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def session() -> Iterator[None]:
    """The process group for the duration of a command (``python -m bigmodel`` under torchrun)."""
    created = init()
    try:
        yield
    finally:
        if created:
            cleanup()


def rank() -> int:
    return rank_world()[0]


def is_main() -> bool:
    """Whether this process writes (logs, metrics, reports, checkpoint metadata): rank 0, or the
    only process. Also true on rank 0 after the group is left."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if world() > 1:
        dist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the checkpoint rank 0 found and verified)."""
    if world() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order."""
    if world() == 1:
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def seed_rank(seed: int, rank_: int, step: int = 0) -> None:
    """Give this rank's global RNG (CPU and CUDA) its own stream, so that what a forward pass draws
    from it (MAE's masks, dropout) differs between ranks. Used at the start of a run of several
    processes, and for a rank that a checkpoint saved no RNG state for (a resume on more ranks)."""
    torch.manual_seed((seed * 1_000_003 + step) * 10_007 + rank_ + 1)


# ---------------------------------------------------------------------------------------------
# Inside a step


def rank_views(model: nn.Module, images: torch.Tensor, generator: torch.Generator, rank_: int, world_: int,
               accum_steps: int) -> list[torch.Tensor]:
    """The views of this rank's rows exactly as one process draws them for the whole batch.

    ``images`` are this rank's rows of the global batch. An objective's ``views`` draws its
    per-image parameters for the whole batch at once (vectorised, in row order), so a rank cannot
    draw for its rows alone: it draws for a global batch in which the other ranks' rows are blank
    images and keeps its own. The draws depend on the batch size only, not on the pixels, and
    every transform works image by image, so its rows are the ones one process would produce. The
    cost is augmenting the global batch on every rank (the data is still read once per rank).
    """
    if world_ == 1:
        return model.views(images, generator)
    rows = rank_rows(len(images) * world_, accum_steps, rank_, world_)
    full = images.new_zeros((len(images) * world_, *images.shape[1:]))
    full[rows] = images
    return [v[rows] for v in model.views(full, generator)]


def grad_sync(net: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Whether this backward pass averages gradients across ranks: off for all but the last
    micro-batch of gradient accumulation (DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``); a no-op for a plain module."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(net, DistributedDataParallel) and not sync:
        return net.no_sync()
    if isinstance(net, FSDPModule):
        net.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor (FSDP2's parameters make it a replicated DTensor)."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def agree(out: dict[str, torch.Tensor], stop: bool, world_: int) -> tuple[dict[str, float] | None, bool]:
    """After a step of a run of several processes: every scalar of ``out`` averaged over the
    ranks, and whether any rank was asked to stop, with one all-reduce and one host sync. A
    non-finite loss on one rank makes the mean non-finite on all, so they stop together.

    In one process nothing is synchronised: ``(None, stop)``."""
    if world_ == 1:
        return None, stop
    keys = list(out)
    flat = torch.stack([out[k].detach().float().reshape(()) for k in keys] + [out[keys[0]].new_tensor(float(stop))])
    dist.all_reduce(flat)
    values = flat.tolist()
    return {k: v / world_ for k, v in zip(keys, values, strict=False)}, values[-1] > 0


# ---------------------------------------------------------------------------------------------
# Applying the run settings to a model


def check(recipe: Any, model: nn.Module) -> None:
    """Refuse, before training, what this process count cannot run: a batch that does not split
    evenly into ``world · accum_steps`` micro-batch shares, activation checkpointing of a model
    without blocks. (Call it before anything is written: a launch's process count is known only
    at run time.)

    Raises:
        RecipeError: naming the setting and what to change.
    """
    try:
        rank_rows(recipe.optim.batch_size, recipe.optim.accum_steps, 0, world())
    except ValueError as e:
        raise RecipeError(str(e)) from None
    if recipe.run.activation_checkpointing and not blocks(model):
        raise RecipeError(f"run.activation_checkpointing=true: architecture {recipe.architecture.name!r} has no "
                          f"repeated blocks (no module list named *blocks) to recompute; set it to false")


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model: the members of every ``ModuleList``/``Sequential`` whose
    name ends in ``blocks`` (a ViT's ``blocks``, a ResNetV2 stage's ``blocks``, ImageGPT's
    ``blocks``, MAE's ``decoder_blocks``), outermost first, none inside another."""
    found: list[nn.Module] = []
    inside: set[int] = set()
    for name, mod in model.named_modules():
        if id(mod) in inside:
            continue
        if name.rsplit(".", 1)[-1].endswith("blocks") and isinstance(mod, nn.ModuleList | nn.Sequential):
            found.extend(mod)
            inside.update(id(m) for block in mod for m in block.modules())
    return found


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of keeping them
    (``torch.utils.checkpoint``, non-reentrant, RNG state preserved so dropout repeats): the
    instance's ``forward`` is wrapped, so weights and state-dict keys are unchanged. Returns the
    number of blocks wrapped (none in a model without blocks, e.g. ``lstm``: see :func:`check`).
    """
    from torch.utils.checkpoint import checkpoint

    found = blocks(model)
    for block in found:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    return len(found)


def shard(model: nn.Module, mesh: Any = None) -> nn.Module:
    """FSDP2: ``fully_shard`` each block, then the whole model (its remaining parameters: stems,
    heads, norms), so that one block's parameters are gathered at a time."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def wrap(model: nn.Module, run: Any, dev: torch.device, world_: int) -> nn.Module:
    """The module a training step runs: ``model`` (an objective) with activation checkpointing
    (``run.activation_checkpointing``), its blocks compiled (``run.compile``) and, with several
    processes, wrapped by DDP or sharded by FSDP2 (``run.strategy``).

    DDP and one process train ``model``'s own parameters. FSDP2 shards a copy (``fully_shard``
    changes the modules it is applied to), and :func:`unwrap` copies the trained weights back.
    """
    net = copy.deepcopy(model) if world_ > 1 and run.strategy == "fsdp" else model
    if run.activation_checkpointing:
        checkpoint_blocks(net)
    if run.compile:  # each block (the backbone's and a decoder's: every path a step takes, MAE's
        for m in blocks(net) or [net.backbone]:  # forward_visible included), else the whole backbone
            m.compile(backend=COMPILE_BACKEND)  # in place: parameter names are unchanged
    if world_ == 1:
        return net
    if run.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        return shard(net, init_device_mesh(dev.type, (world_,)))
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None)


def unwrapped(net: nn.Module) -> nn.Module:
    """The module whose parameters a training step updates (DDP's inner module)."""
    from torch.nn.parallel import DistributedDataParallel

    return net.module if isinstance(net, DistributedDataParallel) else net


def sharded(net: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)


def unwrap(net: nn.Module, model: nn.Module) -> None:
    """After training: ``model`` plain again (no recomputed blocks, not compiled) and holding the
    trained weights (under FSDP2 gathered from the shards, a collective, into ``model`` where it
    is: in host memory)."""
    if sharded(net):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        model.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in full.items()})
        return
    for block in blocks(model):
        block.__dict__.pop("forward", None)  # the class's forward again
    for m in [*blocks(model), getattr(model, "backbone", None)]:
        if m is not None:
            m._compiled_call_impl = None  # what nn.Module.compile set
