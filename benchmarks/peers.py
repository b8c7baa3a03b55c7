"""bigmodel against its peers: one training step of each, same configuration, alternating processes.

    .venv/bin/python benchmarks/peers.py                          # every row, fp32, bf16 and auto, 2 rounds
    .venv/bin/python benchmarks/peers.py --rows mae,igpt --precisions fp32 --rounds 3
    .venv/bin/python benchmarks/peers.py --tiny --rows vit --rounds 1   # tiny sizes (the test)

Each row runs bigmodel's own step — the objective's views (augmentation included) from a uint8
batch, its forward and loss, backward, gradient clipping, the optimizer of ``build.optimizer``, all
through ``trainer.train_step`` as ``bigmodel run`` does — and the peer's usual step on the same
configuration (synthetic data, 2 threads). Precisions: ``fp32`` and ``bf16`` (autocast) on both
sides, and ``auto``: bigmodel's ``run.precision=auto`` (its choice, the trainer's
:func:`bigmodel.train.precision.autocast_dtype`, is recorded) against the peer's default, fp32.
Every measurement is a fresh process (``--worker``), ours and the peer's in turn, the order
swapped every round; a process warms up, then times single steps and reports their median.

Per side and round it records images/s; the peak RSS of the process, and its RSS before the side's
imports and after building (``peak - built`` is what the step adds; the two sides' imports differ
by tens of MB); the FLOPs of one forward + backward (:mod:`bigmodel.analysis.flops`: torch's
FlopCounterMode plus the CPU SDPA kernels it misses, counted once per row and side), the achieved
GFLOP/s and their share of this machine's fp32 (and bf16) matmul rate, a 2048² product on the same
threads measured by the parent process at the start of every round. The ratio is ours / peer per
round; the table shows its median over rounds.

The data-path rows time ``bigmodel run``'s own loop (``commands.pretrain``: batches from the npz in
memory, views, step, logging) against the step alone on views made beforehand: the loop's overhead
is ``1 - ratio``. They read ``mnist.npz`` and ``cifar10.npz`` from ``$BIGMODEL_SHARED_DATA``
(default ``../shared/data``).

Writes ``benchmarks/results/peers.json`` and ``peers.md`` (``--out`` to change), prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BIGMODEL_SHARED_DATA", REPO.parent / "shared" / "data"))
THREADS = 2


@dataclasses.dataclass
class Bench:
    """One side of a row, built in a worker: ``step(i)`` runs training step ``i`` (views included);
    ``flops()`` counts one forward + backward; ``images`` per step."""

    step: Callable[[int], None]
    flops: Callable[[], int]
    images: int
    step_times: Callable[[], list[float]] | None = None  # the data rows: times the loop measured itself
    model: nn.Module | None = None
    autocast: str = "fp32"  # what the step runs under


@dataclasses.dataclass(frozen=True)
class Row:
    title: str
    config: str
    peer: str
    target: float  # ratio ours / peer to reach (data rows: loop / step)
    full: dict[str, Any]  # sizes of the row; ``tiny`` replaces them with tiny ones
    tiny: dict[str, Any]


ROWS: dict[str, Row] = {
    "mae": Row("MAE", "ViT-Tiny encoder 192/12/3, 32 px, patch 4; decoder 128/2/4; mask 0.75; batch 64",
               "transformers ViTMAEForPreTraining (sdpa)", 1.2,
               dict(size="tiny", dims=(192, 12, 3), image=32, patch=4, decoder=(128, 2, 4), batch=64),
               dict(size="nano", dims=(96, 4, 3), image=16, patch=4, decoder=(32, 1, 2), batch=8)),
    "vit": Row("supervised ViT", "ViT-Tiny 192/12/3, 32 px, patch 4, 10 classes, batch 64 (ours: pad-4 crop + flip)",
               "timm VisionTransformer, plain PyTorch step", 1.0,
               dict(size="tiny", dims=(192, 12, 3), image=32, patch=4, batch=64),
               dict(size="nano", dims=(96, 4, 3), image=16, patch=4, batch=8)),
    "simclr": Row("SimCLR", "ResNet-18 (GN+WS, 3x3 stem), 2 augmented views of 64 uint8 32 px images",
                  "lightly SimCLRTransform (PIL) + SimCLRProjectionHead + NTXentLoss, same timm ResNetV2-18", 1.2,
                  dict(width=1.0, image=32, batch=64), dict(width=0.125, image=16, batch=8)),
    "igpt": Row("ImageGPT", "16x16 = 256 tokens, 512 colours, 256/8/8, batch 16",
                "transformers ImageGPTForCausalImageModeling (eager)", 1.5,
                dict(dims=(256, 8, 8), side=16, colours=512, batch=16),
                dict(dims=(32, 2, 2), side=8, colours=16, batch=4)),
    "bit": Row("BiT", "ResNetV2-50x1 (GN+WS), BiT stem, 64 px, 10 classes, batch 16 (ours: pad-4 crop + flip)",
               "timm resnetv2_50x1_bit, plain PyTorch step", 1.0,
               dict(image=64, batch=16), dict(image=32, batch=2)),
    "data-mnist": Row("data path, MNIST",
                      "bigmodel run loop on mnist.npz: supervised ViT-Tiny 28 px, patch 4, batch 64",
                      "the same step alone (views made beforehand); overhead = 1 - ratio", 0.9,
                      dict(file="mnist.npz", size="tiny", image=28, chans=1, batch=64),
                      dict(file="mnist.npz", size="nano", image=28, chans=1, batch=8)),
    "data-cifar10": Row("data path, CIFAR-10",
                        "bigmodel run loop on cifar10.npz: supervised ViT-Tiny 32 px, patch 4, batch 64",
                        "the same step alone (views made beforehand); overhead = 1 - ratio", 0.9,
                        dict(file="cifar10.npz", size="tiny", image=32, chans=3, batch=64),
                        dict(file="cifar10.npz", size="nano", image=32, chans=3, batch=8)),
}


# ---------------------------------------------------------------------------------------------
# bigmodel's side: a validated recipe section, the registries, build.optimizer, trainer.train_step


def _ours(architecture: dict, objective: dict, batch: int, precision: str, chans: int, side: int,
          classes: int = 10) -> Bench:
    from bigmodel.analysis import flops
    from bigmodel.recipe import validate
    from bigmodel.registry import OBJECTIVES
    from bigmodel.train import build
    from bigmodel.train.precision import autocast_dtype
    from bigmodel.train.trainer import train_step

    recipe = validate({"architecture": architecture, "data": {"name": "fractals"}, "objective": objective,
                       "optim": {"batch_size": batch}, "run": {"precision": precision}})
    torch.manual_seed(0)
    net = build.backbone(recipe.architecture)
    model = OBJECTIVES.get(recipe.objective.name)(backbone=net, num_classes=classes, **recipe.objective.kwargs)
    model.train()
    opt = build.optimizer(model, recipe.optim)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, chans, side, side), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (batch,), generator=g)
    dtype = autocast_dtype(precision, torch.device("cpu"))  # auto: the trainer's own choice

    def step(i: int) -> None:
        views = model.views(images, torch.Generator().manual_seed(i))
        train_step(model, opt, views, labels, recipe.optim.accum_steps, recipe.optim.grad_clip, dtype)

    def count() -> int:
        return flops.train_step_flops(model, model.views(images, torch.Generator().manual_seed(0)), labels)

    return Bench(step, count, batch, model=model, autocast=_name(dtype))


def _name(dtype: torch.dtype | None) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def ours_mae(c: dict, precision: str) -> Bench:
    d, depth, heads = c["decoder"]
    return _ours({"name": "vit", "size": c["size"], "image_size": c["image"], "patch_size": c["patch"]},
                 {"name": "mae", "mask_ratio": 0.75, "decoder_dim": d, "decoder_depth": depth, "decoder_heads": heads},
                 c["batch"], precision, 3, c["image"])


def ours_vit(c: dict, precision: str) -> Bench:
    return _ours({"name": "vit", "size": c["size"], "image_size": c["image"], "patch_size": c["patch"]},
                 {"name": "supervised"}, c["batch"], precision, 3, c["image"])


def ours_simclr(c: dict, precision: str) -> Bench:
    return _ours({"name": "resnet", "depth": 18, "width": c["width"], "image_size": c["image"], "stem": "small"},
                 {"name": "simclr"}, c["batch"], precision, 3, c["image"])


def ours_igpt(c: dict, precision: str) -> Bench:
    width, depth, heads = c["dims"]
    return _ours({"name": "igpt", "size": {"width": width, "depth": depth, "heads": heads}, "image_size": c["side"],
                  "in_chans": 3, "colours": c["colours"]},
                 {"name": "autoregressive"}, c["batch"], precision, 3, c["side"])


def ours_bit(c: dict, precision: str) -> Bench:
    return _ours({"name": "resnet", "depth": 50, "width": 1.0, "image_size": c["image"], "stem": "bit"},
                 {"name": "supervised"}, c["batch"], precision, 3, c["image"])


def _data_recipe(c: dict, precision: str, steps: int, out: str):
    from bigmodel.recipe import validate

    return validate({
        "architecture": {"name": "vit", "size": c["size"], "image_size": c["image"], "patch_size": 4,
                         "in_chans": c["chans"]},
        "data": {"name": "npz", "path": str(SHARED_DATA / c["file"])},
        "objective": {"name": "supervised"},
        "optim": {"batch_size": c["batch"], "steps": steps, "warmup_steps": 1},
        "run": {"precision": precision, "log_every": 1, "checkpoint_every": 10**9, "out": out}})


def ours_loop(c: dict, precision: str, steps: int) -> Bench:
    """``bigmodel run``'s pretraining loop; its own per-step images/s (metrics.jsonl) give the times."""
    from rich.console import Console

    from bigmodel.analysis import flops
    from bigmodel.commands.pretrain import pretrain
    from bigmodel.train import build

    tmp = tempfile.mkdtemp(prefix="peers-loop-")
    recipe = _data_recipe(c, precision, steps, tmp)
    data, model = build.experiment(recipe)
    ran: list[float] = []

    def run_all(i: int) -> None:  # the loop runs every step in one call
        if i == 0:
            pretrain(recipe, Path(tmp) / "run", data, model, Console(quiet=True))
            lines = (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
            ran.extend(c["batch"] / json.loads(line)["images_per_s"] for line in lines if line.strip())

    def count() -> int:
        images, labels = next(build.batches(data, c["batch"], 0, 0, 1))
        return flops.train_step_flops(model, model.views(images, torch.Generator().manual_seed(0)), labels)

    dtype = build.autocast_dtype(recipe.run, torch.device("cpu"))
    return Bench(run_all, count, c["batch"], step_times=lambda: ran, model=model, autocast=_name(dtype))


def step_alone(c: dict, precision: str) -> Bench:
    """The data row's reference: ``train_step`` on the views of one batch, made beforehand."""
    from bigmodel.analysis import flops
    from bigmodel.train import build
    from bigmodel.train.trainer import train_step

    recipe = _data_recipe(c, precision, 1, tempfile.gettempdir())
    data, model = build.experiment(recipe)
    model.train()
    opt = build.optimizer(model, recipe.optim)
    dtype = build.autocast_dtype(recipe.run, torch.device("cpu"))
    images, labels = next(build.batches(data, c["batch"], 0, 0, 1))
    views = model.views(images, torch.Generator().manual_seed(0))

    def step(i: int) -> None:
        train_step(model, opt, views, labels, recipe.optim.accum_steps, recipe.optim.grad_clip, dtype)

    return Bench(step, lambda: flops.train_step_flops(model, views, labels), c["batch"], model=model,
                 autocast=_name(dtype))


# ---------------------------------------------------------------------------------------------
# The peers: each library's own modules in the plain step its documentation shows


def _plain(model: nn.Module, loss_fn: Callable[[], torch.Tensor], precision: str, images: int,
           before: Callable[[int], None] | None = None) -> Bench:
    """``loss_fn()`` under autocast (bf16 rows; ``auto`` is fp32, the peers' default), backward,
    AdamW (torch's defaults), zero_grad."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    bf16 = precision == "bf16"

    def step(i: int) -> None:
        if before is not None:
            before(i)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def count() -> int:
        from bigmodel.analysis import flops

        with flops.counter() as counter:
            loss_fn().backward()
        opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    return Bench(step, count, images, model=model, autocast="bf16" if bf16 else "fp32")


def _float_batch(b: int, c: int, side: int) -> torch.Tensor:
    return torch.rand(b, c, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1


def peer_mae(c: dict, precision: str) -> Bench:
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    (dim, depth, heads), (d, d_depth, d_heads) = c["dims"], c["decoder"]
    cfg = ViTMAEConfig(image_size=c["image"], patch_size=c["patch"], num_channels=3, hidden_size=dim,
                       num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
                       decoder_hidden_size=d, decoder_num_hidden_layers=d_depth, decoder_num_attention_heads=d_heads,
                       decoder_intermediate_size=4 * d, mask_ratio=0.75, qkv_bias=True)
    torch.manual_seed(0)
    model = ViTMAEForPreTraining(cfg)
    x = _float_batch(c["batch"], 3, c["image"])
    return _plain(model, lambda: model(pixel_values=x).loss, precision, c["batch"])


def peer_vit(c: dict, precision: str) -> Bench:
    from timm.models.vision_transformer import VisionTransformer

    dim, depth, heads = c["dims"]
    torch.manual_seed(0)
    model = VisionTransformer(img_size=c["image"], patch_size=c["patch"], embed_dim=dim, depth=depth, num_heads=heads,
                              num_classes=10)
    x, y = _float_batch(c["batch"], 3, c["image"]), torch.randint(0, 10, (c["batch"],))
    return _plain(model, lambda: F.cross_entropy(model(x), y, label_smoothing=0.1), precision, c["batch"])


def peer_simclr(c: dict, precision: str) -> Bench:
    import numpy as np
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from lightly.transforms import SimCLRTransform
    from PIL import Image
    from timm.layers import GroupNormAct, StdConv2d, make_divisible
    from timm.models.resnetv2 import ResNetV2

    conv = partial(StdConv2d, eps=1e-8)
    stem = make_divisible(64 * c["width"])
    torch.manual_seed(0)
    backbone = ResNetV2(layers=[2, 2, 2, 2],
                        channels=tuple(make_divisible(w * c["width"]) for w in (64, 128, 256, 512)),
                        num_classes=0, in_chans=3, stem_chs=stem, stem_type="fixed", basic=True, bottle_ratio=1.0,
                        conv_layer=conv, norm_layer=partial(GroupNormAct, num_groups=min(32, stem)))
    backbone.stem = nn.Sequential(OrderedDict(conv=conv(3, stem, kernel_size=3, stride=1)))
    head = SimCLRProjectionHead(backbone.num_features, 512, 128)
    model = nn.Sequential(backbone, head)
    criterion = NTXentLoss(temperature=0.5)
    transform = SimCLRTransform(input_size=c["image"], cj_strength=0.5, min_scale=0.08, gaussian_blur=0.5,
                                sigmas=(0.1, 2.0), normalize={"mean": [0.5] * 3, "std": [0.5] * 3})
    rng = np.random.default_rng(0)
    pil = [Image.fromarray(a) for a in rng.integers(0, 256, (c["batch"], c["image"], c["image"], 3), dtype=np.uint8)]
    views: list[torch.Tensor] = []

    def augment(i: int) -> None:  # lightly's transform on each PIL image, collated as a DataLoader would
        pairs = [transform(im) for im in pil]
        views[:] = [torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])]

    def loss() -> torch.Tensor:  # lightly's SimCLR example: one forward per view
        return criterion(model(views[0]), model(views[1]))

    augment(0)
    return _plain(model, loss, precision, c["batch"], before=augment)


def peer_igpt(c: dict, precision: str) -> Bench:
    from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling

    width, depth, heads = c["dims"]
    cfg = ImageGPTConfig(vocab_size=c["colours"] + 1, n_positions=c["side"] ** 2, n_embd=width, n_layer=depth,
                         n_head=heads)
    torch.manual_seed(0)
    model = ImageGPTForCausalImageModeling(cfg)
    ids = torch.randint(0, c["colours"], (c["batch"], c["side"] ** 2), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = c["colours"]  # the start-of-sequence token, as ImageGPT's processor puts it
    return _plain(model, lambda: model(input_ids=ids, labels=ids).loss, precision, c["batch"])


def peer_bit(c: dict, precision: str) -> Bench:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10)
    x, y = _float_batch(c["batch"], 3, c["image"]), torch.randint(0, 10, (c["batch"],))
    return _plain(model, lambda: F.cross_entropy(model(x), y, label_smoothing=0.1), precision, c["batch"])


SIDES: dict[str, tuple[Callable, Callable]] = {
    "mae": (ours_mae, peer_mae), "vit": (ours_vit, peer_vit), "simclr": (ours_simclr, peer_simclr),
    "igpt": (ours_igpt, peer_igpt), "bit": (ours_bit, peer_bit),
}


# ---------------------------------------------------------------------------------------------
# A worker process: build one side, warm up, time single steps


def _rss_mb() -> float:
    """The process's RSS high-water mark, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_now_mb() -> float:
    """The process's current RSS, MB (the high-water mark where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return _rss_mb()


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    row = ROWS[spec["row"]]
    c = row.tiny if spec["tiny"] else row.full
    base = _rss_mb()
    warmup, steps = spec["warmup"], spec["steps"]
    if spec["row"].startswith("data-"):
        bench = (ours_loop(c, spec["precision"], warmup + steps) if spec["side"] == "ours"
                 else step_alone(c, spec["precision"]))
    else:
        ours, peer = SIDES[spec["row"]]
        bench = (ours if spec["side"] == "ours" else peer)(c, spec["precision"])
    built = _rss_now_mb()
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        bench.step(i)
        times.append(time.perf_counter() - t)
    if bench.step_times is not None:
        times = bench.step_times()
    peak = _rss_mb()
    step_s = statistics.median(times[warmup:])
    out = {"images_per_s": bench.images / step_s, "step_s": step_s, "steps": len(times) - warmup,
           "peak_rss_mb": peak, "base_rss_mb": base, "built_rss_mb": built, "autocast": bench.autocast}
    if spec["flops"]:
        out["gflop_per_step"] = bench.flops() / 1e9
    return out


# ---------------------------------------------------------------------------------------------
# The parent: matmul rate, alternating processes, table, JSON


def matmul_gflops(dtype: torch.dtype, threads: int = THREADS, n: int = 2048, reps: int = 5) -> float:
    """Median rate of an ``n²`` matrix product on ``threads`` threads."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def measure(row: str, side: str, precision: str, args: argparse.Namespace, flops: bool) -> dict[str, Any]:
    spec = {"row": row, "side": side, "precision": precision, "tiny": args.tiny, "steps": args.steps,
            "warmup": args.warmup, "threads": args.threads, "flops": flops}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{row}/{side}/{precision} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _sig(x: Any, digits: int = 4) -> Any:
    return float(f"{x:.{digits}g}") if isinstance(x, float) else x


def side_figures(got: dict[str, Any], gflop: float, rate: dict[str, float]) -> dict[str, Any]:
    """A worker's figures with the achieved GFLOP/s and their share of this round's matmul rates."""
    gflops = gflop / got["step_s"]
    return {k: _sig(v) for k, v in {**got, "gflop_per_step": gflop, "gflops": gflops,
                                    "matmul_share_fp32": gflops / rate["fp32"],
                                    "matmul_share_bf16": gflops / rate["bf16"]}.items()}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over rounds of each side's figures; every round's ratio, and their median."""
    out: dict[str, Any] = {}
    for side in ("ours", "peer"):
        first = runs[0][side]
        out[side] = {k: (_sig(statistics.median(r[side][k] for r in runs)) if isinstance(v, float) else v)
                     for k, v in first.items()}
    out["ratio_per_round"] = [r["ratio"] for r in runs]
    out["ratio"] = _sig(statistics.median(out["ratio_per_round"]))
    return out


def table(result: dict[str, Any]) -> str:
    rate, m = result["matmul_gflops"], result["machine"]
    lines = [f"{m['cpu']}, {m['threads']} threads, torch {m['torch']}; bf16 unit: {m['bf16_unit']}. Matmul 2048²: "
             f"fp32 {rate['fp32']:.0f} GFLOP/s, bf16 {rate['bf16']:.0f} GFLOP/s (median of the rounds). "
             f"Load average {m['load_before']} before, {m['load_after']} after.", "",
             "| row | precision (ours / peer) | ours img/s | peer img/s | ratio (rounds) | target "
             "| ours GFLOP/s (% fp32 matmul) | peer GFLOP/s (%) | peak RSS MB ours / peer | of it the step's |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        o, p = r["ours"], r["peer"]
        rounds = ", ".join(f"{x:.2f}" for x in r["ratio_per_round"])
        prec = r["precision"] if r["precision"] != "auto" else f"auto: {o['autocast']} / {p['autocast']}"
        lines.append(f"| {r['title']} | {prec} | {o['images_per_s']:.1f} | {p['images_per_s']:.1f} | "
                     f"**{r['ratio']:.2f}×** ({rounds}) | {r['target']} {'✓' if r['met'] else '✗'} | "
                     f"{o['gflops']:.0f} ({100 * o['matmul_share_fp32']:.0f}%) | "
                     f"{p['gflops']:.0f} ({100 * p['matmul_share_fp32']:.0f}%) | "
                     f"{o['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f} | "
                     f"{o['peak_rss_mb'] - o['built_rss_mb']:.0f} / {p['peak_rss_mb'] - p['built_rss_mb']:.0f} |")
    lines += ["", "| row | configuration | peer |", "|---|---|---|"]
    lines += [f"| {ROWS[n].title} | {ROWS[n].config} | {ROWS[n].peer} |" for n in result["settings"]["rows"]]
    return "\n".join(lines)


PRECISIONS = ("fp32", "bf16", "auto")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help=f"comma-separated, of: {', '.join(PRECISIONS)}")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps per process (the median is taken)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--threads", type=int, default=THREADS, help="intra-op threads of every process")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (seconds; for the test)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "peers"),
                   help="writes OUT.json and OUT.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    rows, precisions = args.rows.split(","), args.precisions.split(",")
    bad = [r for r in rows if r not in ROWS] + [q for q in precisions if q not in PRECISIONS]
    if bad:
        p.error(f"unknown: {', '.join(bad)}; rows: {', '.join(ROWS)}; precisions: {', '.join(PRECISIONS)}")
    from bigmodel.train.precision import cpu_bf16, cpu_name

    load_before = round(os.getloadavg()[0], 2)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    gflop: dict[tuple[str, str], float] = {}  # FLOPs of a step: counted once per row and side
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(r, q): [] for r in rows for q in precisions}
    for rnd in range(args.rounds):
        rate = {"fp32": matmul_gflops(torch.float32, args.threads), "bf16": matmul_gflops(torch.bfloat16, args.threads)}
        for k, v in rate.items():
            rates[k].append(v)
        for row in rows:
            for precision in precisions:
                order = ("ours", "peer") if rnd % 2 == 0 else ("peer", "ours")
                got = {side: measure(row, side, precision, args, flops=(row, side) not in gflop) for side in order}
                for side in order:
                    gflop.setdefault((row, side), got[side].pop("gflop_per_step", None))
                got = {side: side_figures(got[side], gflop[(row, side)], rate) for side in ("ours", "peer")}
                got["ratio"] = _sig(got["ours"]["images_per_s"] / got["peer"]["images_per_s"])
                runs[(row, precision)].append(got)
                print(f"round {rnd + 1}: {row:<12} {precision}  ours {got['ours']['images_per_s']:8.1f} img/s "
                      f"({got['ours']['autocast']})  peer {got['peer']['images_per_s']:8.1f} img/s "
                      f"({got['peer']['autocast']})  ratio {got['ratio']:.2f}", flush=True)
    result = {
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
                    "bf16_unit": cpu_bf16(), "load_before": load_before, "load_after": round(os.getloadavg()[0], 2)},
        "settings": {"rows": rows, "precisions": precisions, "rounds": args.rounds, "steps": args.steps,
                     "warmup": args.warmup, "tiny": args.tiny},
        "matmul_gflops": {k: _sig(statistics.median(v)) for k, v in rates.items()},
        "matmul_gflops_per_round": {k: [_sig(x) for x in v] for k, v in rates.items()},
        "rows": [{"row": r, "title": ROWS[r].title, "precision": q, "config": ROWS[r].config, "peer": ROWS[r].peer,
                  "target": ROWS[r].target, **summarise(runs[(r, q)]), "rounds": runs[(r, q)]}
                 for r in rows for q in precisions],
    }
    for r in result["rows"]:
        r["met"] = r["ratio"] >= r["target"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    text = table(result)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
