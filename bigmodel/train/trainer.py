"""The one training loop (:func:`fit`), shared by pretraining and fine-tuning.

:func:`fit` knows nothing of recipes or protocols: it trains an objective-like module (``views`` and
``forward(views, labels) -> {"loss", ...}``, see :class:`bigmodel.objectives.base.Objective`) with an
optimizer, a learning-rate function and a stream of batches, through :func:`train_step`, and when
given a folder it checkpoints, logs ``metrics.jsonl`` and resumes from there.
:func:`bigmodel.commands.pretrain.pretrain` builds those from a recipe;
:mod:`bigmodel.transfer.finetune` builds them from BiT-HyperRule.

Under torchrun every process runs that entry point (DESIGN.md §7): :func:`fit` then sees the module a
step runs (DDP or FSDP2, from :func:`bigmodel.train.distributed.wrap`), its rank and the world size
(``Loop.rank``/``Loop.world``), and nothing else of the distribution — see
:mod:`bigmodel.train.distributed` for how the run stays the run of one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bigmodel.errors import NonFiniteLoss
from bigmodel.recipe import OptimConfig
from bigmodel.train import checkpoint, distributed, precision
from bigmodel.train.metrics import MetricsLog, StepProgress
from bigmodel.train.signals import GracefulStop

Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]
Probe = Callable[[int, torch.nn.Module], dict[str, float]]  # (step, the module a step runs) -> scalars to log
_clock = time.perf_counter  # replaced by tests for exact rates


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr · min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, views: list[torch.Tensor], labels: torch.Tensor,
               accum_steps: int = 1, grad_clip: float | None = None,
               dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Forward/backward over ``accum_steps`` micro-batches (under autocast to ``dtype`` when given),
    clip the global gradient norm to ``grad_clip``, step. Returns detached scalars (the loss, the
    objective's metrics and ``grad_norm``, before clipping).

    ``model`` may be wrapped by DDP or sharded by FSDP2: gradients are then averaged across the
    ranks in the backward pass of the last micro-batch only."""
    totals: dict[str, torch.Tensor] = {}
    chunks = zip(*(v.chunk(accum_steps) for v in views), labels.chunk(accum_steps), strict=True)
    for i, (*micro, y) in enumerate(chunks):
        with distributed.grad_sync(model, i == accum_steps - 1):
            with torch.autocast(micro[0].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = model(list(micro), y)
            (out["loss"] / accum_steps).backward()
        for k, v in out.items():
            totals[k] = totals.get(k, 0) + v.detach().float() / accum_steps
    if grad_clip is not None:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:  # measured all the same: a finite loss can come with non-finite gradients
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    totals["grad_norm"] = distributed.full_norm(norm)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return totals


@dataclasses.dataclass(frozen=True)
class Loop:
    """How :func:`fit` runs. Without ``run_dir`` it neither checkpoints nor writes metrics."""

    steps: int
    seed: int = 0  # step ``s`` draws its views from a generator seeded by ``(seed, s)``
    accum_steps: int = 1
    grad_clip: float | None = None
    dtype: torch.dtype | None = None  # autocast dtype; None = fp32
    deterministic: bool = False  # deterministic kernels (precision.deterministic): bit-exact resume on a GPU
    run_dir: Path | None = None  # checkpoints/ and metrics.jsonl go here; a run there is resumed
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 20
    tensorboard: bool = False  # with run_dir: TensorBoard event files in run_dir/tensorboard too
    stop_on_signal: bool = True  # with run_dir: SIGTERM/SIGINT finish the step, checkpoint and stop
    label: str = "pretrain"  # the progress line's label
    lr_key: str = "optim.lr"  # named in the non-finite-loss message
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # saved in every checkpoint's meta.json
    rank: int = 0  # this process among ``world`` training together (torchrun); only rank 0 writes
    world: int = 1
    monitor: Probe | None = None  # run on every rank at step 0, every ``monitor_every`` steps and the last
    monitor_every: int = 1


def resume(model: torch.nn.Module, opt: torch.optim.Optimizer, loop: Loop, console: Console) -> int:
    """Load the latest checkpoint of ``loop.run_dir`` (weights, optimizer, RNG) if any; its step,
    else 0. With several processes rank 0 finds and verifies it, and every rank loads it (a
    checkpoint of any process count: see :func:`bigmodel.train.checkpoint.restore`)."""
    last = None
    if loop.run_dir is not None and loop.rank == 0:
        last = checkpoint.latest(loop.run_dir / "checkpoints")
    if loop.world > 1:
        last = distributed.broadcast(last)
    if last is None:
        return 0
    step = checkpoint.restore(last, model, opt, loop.seed, loop.rank, loop.world)
    console.print(f"resuming from {last} (step {step})")
    return step


def save(folder: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, loop: Loop) -> None:
    """Checkpoint ``step``: safetensors from one process, a sharded DCP checkpoint from several."""
    if loop.world > 1:
        checkpoint.save_sharded(folder, step, model, opt, loop.meta, keep=loop.keep_checkpoints)
        return
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": step}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    checkpoint.save(folder, step, model, state, loop.meta, keep=loop.keep_checkpoints)


class FirstNonFinite:
    """The first step whose loss or gradient norm was not finite, kept on the device: updated after
    every step with ``torch.where`` (no host sync in the step), read where the loop syncs anyway (log
    and checkpoint steps, the last step), so a divergence is reported at the step it happened."""

    def __init__(self, dev: torch.device):
        self.step = torch.zeros((), dtype=torch.int64, device=dev)  # 0: every step so far was finite
        self.values = torch.zeros(2, device=dev)  # that step's loss and gradient norm

    def update(self, out: dict[str, torch.Tensor], step: int) -> None:
        values = torch.stack([out[k].detach().float().reshape(()).to(self.values.device)
                              for k in ("loss", "grad_norm")])
        new = (self.step == 0) & ~torch.isfinite(values).all()
        self.step = torch.where(new, step, self.step)
        self.values = torch.where(new, values, self.values)

    def first(self, step: int, scalars: dict[str, float]) -> tuple[dict[str, float], int]:
        """``(scalars, step)`` of the first non-finite step if there was one, else the given ones."""
        bad, (loss, norm) = int(self.step), self.values.tolist()
        return ({**scalars, "loss": loss, "grad_norm": norm}, bad) if bad else (scalars, step)


def check_finite(scalars: dict[str, float], step: int, folder: Path | None, loop: Loop) -> None:
    """Raise :class:`NonFiniteLoss` if the loss or the gradient norm is not finite (``step``: where)."""
    bad = next((k for k in ("loss", "grad_norm") if not math.isfinite(scalars[k])), None)
    if bad is not None:  # weights updated by non-finite gradients are never saved
        kept = f"the last good checkpoint stays in {folder}" if folder else "nothing was saved"
        where = " (on at least one process)" if loop.world > 1 else ""
        raise NonFiniteLoss(f"{'loss' if bad == 'loss' else 'gradient norm'} became {scalars[bad]} at step {step}"
                            f"{where}; {kept} (try a lower {loop.lr_key})")


def monitored(loop: Loop, step: int, net: torch.nn.Module, log: MetricsLog | None,
              history: list[dict[str, Any]], console: Console) -> float:
    """Run ``loop.monitor`` after ``step`` steps with the RNG forked (the run draws what it would
    without it) and log what it returns as a record of that step, with ``monitor_s``; its seconds."""
    t0, dev = _clock(), next(net.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        values = loop.monitor(step, net)
    seconds = _clock() - t0
    if values:  # only rank 0 scores
        history.append({"step": step, **values, "monitor_s": round(seconds, 3)})
        if log is not None:
            log.write(history[-1])
        shown = "  ".join(f"{k.removeprefix('monitor_')} {v:.4g}" for k, v in values.items())
        console.print(f"monitor at step {step}: {shown}  ({seconds:.1f}s)", highlight=False)
    return seconds


def fit(model: torch.nn.Module, opt: torch.optim.Optimizer, lr_fn: Callable[[int], float],
        batches_fn: Callable[[int], Batches], loop: Loop, console: Console,
        net: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train ``model`` for steps ``[start, loop.steps)``, where ``start`` is the step of the latest
    checkpoint in ``loop.run_dir`` (0 without one). ``batches_fn(start)`` yields ``(uint8 images
    (B, C, H, W), labels (B,))`` per step (this rank's rows); ``lr_fn(step)`` sets every parameter
    group's lr. ``net`` is the module a step runs (``model`` wrapped by DDP or FSDP2; default
    ``model``, which draws the views). A parameter group with an ``lr_scale`` (layer-wise lr decay)
    gets ``lr_fn(step) · lr_scale``. With ``loop.world > 1`` every rank calls this, and the ranks
    agree after each step on the mean scalars and on stopping.

    Returns ``{"start_step", "steps_done", "stopped", "history"}`` (``start_step``: the step this call
    resumed from, 0 for a fresh run): ``history`` holds the records logged by this
    call (every ``log_every`` steps and at checkpoints, and ``loop.monitor``'s), as written to
    ``metrics.jsonl``. ``images_per_s`` counts training time only, not the monitor's.
    """
    net = model if net is None else net
    dev = next(net.parameters()).device
    ckpt_dir = loop.run_dir / "checkpoints" if loop.run_dir is not None else None
    shown = console if loop.rank == 0 else Console(quiet=True)  # only rank 0 prints
    start = resume(net, opt, loop, shown)
    log = None
    if loop.run_dir is not None and loop.rank == 0:  # only rank 0 writes
        loop.run_dir.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(loop.run_dir / "metrics.jsonl", start,
                         loop.run_dir / "tensorboard" if loop.tensorboard else None)
    history: list[dict[str, Any]] = []
    if loop.monitor is not None and start == 0:  # the baseline: the weights as pretraining starts them
        monitored(loop, 0, net, log, history, shown)
    images_seen, t_last, done, stopping, watch = 0, _clock(), start, False, FirstNonFinite(dev)
    signals = ckpt_dir is not None and loop.stop_on_signal
    stop_ctx = GracefulStop() if signals else contextlib.nullcontext(GracefulStop())
    progress = StepProgress(shown, loop.steps, start, loop.label)
    with (progress as bar, stop_ctx as stop, distributed.data_parallel(loop.world),
          precision.deterministic(loop.deterministic)):
        for step, (images, labels) in enumerate(batches_fn(start), start):
            for group in opt.param_groups:
                group["lr"] = lr_fn(step) * group.get("lr_scale", 1.0)
            gen = torch.Generator().manual_seed(loop.seed * 1_000_003 + step)  # draws on the CPU, any device
            images = images.to(dev, non_blocking=True)  # uint8: the views are made where the step runs
            views = distributed.rank_views(model, images, gen, loop.rank, loop.world, loop.accum_steps)
            views = [v.to(dev, non_blocking=True) for v in views]
            out = train_step(net, opt, views, labels.to(dev), loop.accum_steps, loop.grad_clip, loop.dtype)
            distributed.unwrapped(net).after_step(step)  # the module the step trained (FSDP: a sharded copy)
            images_seen += len(images) * loop.world
            done = step + 1
            watch.update(out, done)
            scalars, stopping = distributed.agree(out, stop.requested, loop.world)  # several processes: one sync
            boundary = ckpt_dir is not None and (done % loop.checkpoint_every == 0 or stopping)
            logging = done % loop.log_every == 0 or boundary or done == loop.steps
            if logging or scalars is not None:  # several processes agree on every step's scalars
                scalars = scalars or {k: float(v) for k, v in out.items()}  # one process: the only host sync
                check_finite(*(watch.first(done, scalars) if loop.world == 1 else (scalars, done)), ckpt_dir, loop)
            if logging:
                now = _clock()
                scalars["images_per_s"] = images_seen / max(now - t_last, 1e-9)
                history.append({"step": done, "lr": lr_fn(step), **scalars})
                if log is not None:
                    log.write(history[-1])
                bar.update(done, {"loss": scalars["loss"], "img/s": scalars["images_per_s"]})
                images_seen, t_last = 0, now
            if loop.monitor is not None and (done % loop.monitor_every == 0 or done == loop.steps):
                t_last += monitored(loop, done, net, log, history, shown)  # before the checkpoint: a resume keeps it
            if boundary or (ckpt_dir is not None and done == loop.steps):
                save(ckpt_dir, done, net, opt, loop)
            if stopping:
                break
    if log is not None:
        log.close()
    return {"start_step": start, "steps_done": done, "stopped": stopping, "history": history}

