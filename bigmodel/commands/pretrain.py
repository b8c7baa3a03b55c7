"""Pretraining from a recipe: the entry point that builds what the engine runs (STYLE.md 9, MAE's
``main_pretrain`` over ``engine_pretrain``).

:func:`pretrain` turns a validated recipe, its dataset and its objective (from
:func:`bigmodel.train.build.experiment`) into the optimizer, the learning-rate schedule, the
batches and the process settings, and hands them to the one loop, :func:`bigmodel.train.trainer.fit`,
which knows nothing of recipes. ``bigmodel run`` and ``bigmodel pretrain`` call it
(:mod:`bigmodel.commands.run`); fine-tuning builds its own from BiT-HyperRule
(:mod:`bigmodel.transfer.finetune`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bigmodel.data.base import ImageDataset
from bigmodel.objectives.base import Objective
from bigmodel.recipe import Recipe
from bigmodel.train import build, distributed, trainer
from bigmodel.transfer.monitor import Monitor


def pretrain(recipe: Recipe, run_dir: Path, data: ImageDataset, model: Objective,
             console: Console | None = None) -> dict[str, Any]:
    """Pretrain ``model`` on ``data`` (both from :func:`~bigmodel.train.build.experiment`) into ``run_dir``,
    resuming from its latest checkpoint if there is one. Returns a summary.

    Under torchrun every rank calls it (after :func:`bigmodel.train.distributed.init`): each
    trains on its rows of the global batch, with the settings of ``recipe.run`` applied by
    :func:`bigmodel.train.distributed.wrap`. On return ``model`` is plain again and holds the
    trained weights on every rank."""
    console = console or Console()
    cfg, run = recipe.optim, recipe.run
    rank, world = distributed.rank(), distributed.world()
    distributed.check(recipe, model)
    model.setup(data)
    dev = build.device(run)
    if not (world > 1 and run.strategy == "fsdp"):  # FSDP2 moves its shards there; the whole model stays
        model.to(dev)
    net = distributed.wrap(model.train(), run, dev, world)
    if world > 1:
        distributed.seed_rank(run.seed, rank)  # forward-time draws (MAE's masks) differ between ranks
    opt = build.optimizer(distributed.unwrapped(net), cfg)
    dtype = build.autocast_dtype(run, dev)
    probe = Monitor(run.monitor, model, run.eval_batch_size, dtype) if run.monitor is not None else None
    loop = trainer.Loop(steps=cfg.steps, seed=run.seed, accum_steps=cfg.accum_steps, grad_clip=cfg.grad_clip,
                        dtype=dtype, deterministic=run.deterministic, run_dir=run_dir,
                        checkpoint_every=run.checkpoint_every,
                        keep_checkpoints=run.keep_checkpoints, log_every=run.log_every, tensorboard=run.tensorboard,
                        rank=rank, world=world, monitor=probe, monitor_every=run.monitor.every if probe else 1,
                        meta={"recipe": recipe.raw, "num_classes": data.num_classes,  # rebuilt without the data
                              "classes": list(getattr(data, "classes", None) or [])})
    out = trainer.fit(model, opt, lambda step: trainer.lr_at(step, cfg),
                      lambda start: build.batches(data, cfg.batch_size, run.seed, start, cfg.steps, run.num_workers,
                                                  rank, world, cfg.accum_steps),
                      loop, console, net=net)
    distributed.unwrap(net, model)
    if out["stopped"] and rank == 0:
        console.print(f"stopped at step {out['steps_done']}; checkpoint saved, resume with --resume {run_dir}")
    return {"start_step": out["start_step"], "steps_done": out["steps_done"], "stopped": out["stopped"],
            "device": str(dev), "precision": str(dtype or torch.float32).replace("torch.", ""), "processes": world}
