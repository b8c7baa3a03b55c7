"""The one pretraining loop, shared by every architecture × objective pair."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bigmodel.data.base import ImageDataset
from bigmodel.objectives.base import Objective
from bigmodel.recipe import OptimConfig, Recipe
from bigmodel.train import build, checkpoint
from bigmodel.train.logging import GracefulStop, MetricsLog, StepProgress


class NonFiniteLoss(RuntimeError):
    pass


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr · min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_step(model: Objective, opt: torch.optim.Optimizer, views: list[torch.Tensor], labels: torch.Tensor,
               cfg: OptimConfig, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Forward/backward over ``accum_steps`` micro-batches, clip, step. Returns detached scalars."""
    totals: dict[str, torch.Tensor] = {}
    chunks = zip(*(v.chunk(cfg.accum_steps) for v in views), labels.chunk(cfg.accum_steps), strict=True)
    for *micro, y in chunks:
        with torch.autocast(micro[0].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = model(list(micro), y)
        (out["loss"] / cfg.accum_steps).backward()
        for k, v in out.items():
            totals[k] = totals.get(k, 0) + v.detach().float() / cfg.accum_steps
    if cfg.grad_clip is not None:
        totals["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return totals


def pretrain(recipe: Recipe, run_dir: Path, data: ImageDataset, model: Objective,
             console: Console | None = None) -> dict[str, Any]:
    """Pretrain ``model`` on ``data`` (both from :func:`build.experiment`) into ``run_dir``,
    resuming from its latest checkpoint if there is one. Returns a summary."""
    console = console or Console()
    cfg, run = recipe.optim, recipe.run
    model.setup(data)
    dev = build.device(run)
    model.to(dev).train()
    opt = build.optimizer(model, cfg)
    dtype = build.autocast_dtype(run, dev)

    ckpt_dir = run_dir / "checkpoints"
    start, last = 0, checkpoint.latest(ckpt_dir)
    if last is not None:
        checkpoint.load_weights(last, model)
        state = checkpoint.load_state(last)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = int(state["step"])
        console.print(f"resuming from {last} (step {start})")
    log = MetricsLog(run_dir / "metrics.jsonl", start)

    def save(step: int) -> None:
        state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": step}
        checkpoint.save(ckpt_dir, step, model, state, {"recipe": recipe.raw}, keep=run.keep_checkpoints)

    images_seen, t_last, done = 0, time.perf_counter(), start
    stream = build.batches(data, cfg.batch_size, run.seed, start, cfg.steps, run.num_workers)
    with StepProgress(console, cfg.steps, start, "pretrain") as bar, GracefulStop() as stop:
        for step, (images, labels) in enumerate(stream, start):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            gen = torch.Generator().manual_seed(run.seed * 1_000_003 + step)
            views = [v.to(dev, non_blocking=True) for v in model.views(images, gen)]
            out = train_step(model, opt, views, labels.to(dev), cfg, dtype)
            images_seen += len(images)
            done = step + 1
            boundary = done % run.checkpoint_every == 0 or done == cfg.steps or stop.requested
            if done % run.log_every == 0 or boundary:
                scalars = {k: float(v) for k, v in out.items()}  # the only host sync
                if not math.isfinite(scalars["loss"]):
                    raise NonFiniteLoss(f"loss became {scalars['loss']} at step {done}; the last good "
                                        f"checkpoint stays in {ckpt_dir} (try a lower optim.lr)")
                now = time.perf_counter()
                scalars["images_per_s"] = images_seen / max(now - t_last, 1e-9)
                log.write({"step": done, "lr": lr_at(step, cfg), **scalars})
                bar.update(done, {"loss": scalars["loss"], "img/s": scalars["images_per_s"]})
                images_seen, t_last = 0, now
            if boundary:
                save(done)
            if stop.requested:
                console.print(f"stopped at step {done}; checkpoint saved, resume with --resume {run_dir}")
                break
    return {"steps_done": done, "stopped": stop.requested, "device": str(dev),
            "precision": str(dtype or torch.float32).replace("torch.", "")}
