#!/usr/bin/env bash
# bigmodel on one GPU: MAE ViT-B/16 and supervised ViT-B/16 at 224 px, bf16 autocast + torch.compile,
# through the trainer's own code (build.optimizer, distributed.wrap for run.compile, trainer.train_step).
# Prints and writes images/s and MFU of the training step (model FLOPs of forward + backward, counted
# by bigmodel.analysis.flops, against the GPU's dense bf16 peak) to benchmarks/results/gpu.json, and
# the time to make one batch's views as the trainer does (the uint8 batch copied to the device and
# augmented there: when it exceeds the step, a run is input-bound) and, for reference, on the host.
#
#   benchmarks/gpu.sh                         # a CUDA machine: within 8 minutes (compilation included)
#   benchmarks/gpu.sh --peak-tflops 989       # a GPU missing from the table of peaks below
#   benchmarks/gpu.sh --tiny                  # tiny sizes on the CPU, seconds (the test; no inductor build)
#
# Options: --steps N (timed, default 50), --warmup N (default 10; compilation happens there),
# --batch B (default 256), --no-compile, --out FILE. Python: $PYTHON, else .venv/bin/python, else python3.
# Installs nothing unless an import bigmodel needs is missing, and then only the missing packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

missing=$("$PY" - <<'EOF'
import importlib.util
need = {"torch": "torch", "torchvision": "torchvision", "timm": "timm>=1.0.31,<1.1", "numpy": "numpy",
        "sklearn": "scikit-learn", "pydantic": "pydantic>=2.5", "yaml": "pyyaml", "safetensors": "safetensors",
        "rich": "rich", "webdataset": "webdataset", "PIL": "pillow"}
print(" ".join(spec for module, spec in need.items() if importlib.util.find_spec(module) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "installing what bigmodel needs and this Python lacks: $missing" >&2
  "$PY" -m pip install --quiet $missing || { echo "could not install: $missing" >&2; exit 1; }
fi

# a hard stop, so that a stuck compile cannot run past the 8 minutes; the rows measured so far are kept
exec timeout --signal=TERM 470 "$PY" - "$@" <<'EOF'
"""The measurement; see the header of benchmarks/gpu.sh."""
import argparse
import json
import os
import time
from pathlib import Path

import torch

from bigmodel.analysis import flops
from bigmodel.recipe import validate
from bigmodel.registry import OBJECTIVES
from bigmodel.train import build, distributed
from bigmodel.train.trainer import train_step

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; no sparsity), by a substring of the device name
PEAKS = {"B200": 2250, "H200": 989, "H100 NVL": 835, "H100 PCIe": 756, "H100": 989, "A100": 312, "L40S": 362, "L40": 181,
         "L4": 121}

p = argparse.ArgumentParser()
p.add_argument("--tiny", action="store_true")
p.add_argument("--steps", type=int, default=50)
p.add_argument("--warmup", type=int, default=10)
p.add_argument("--batch", type=int, default=256)
p.add_argument("--no-compile", action="store_true")
p.add_argument("--peak-tflops", type=float)
p.add_argument("--out", default="benchmarks/results/gpu.json")
args = p.parse_args()

cuda = torch.cuda.is_available()
if not cuda and not args.tiny:
    raise SystemExit("no CUDA device: benchmarks/gpu.sh measures a GPU (--tiny runs tiny sizes on the CPU)")
dev = torch.device("cuda" if cuda else "cpu")
name = torch.cuda.get_device_name(dev) if cuda else "cpu"
peak = args.peak_tflops or (next((v for k, v in PEAKS.items() if k in name), None) if cuda else None)
if args.tiny:
    args.batch, args.steps, args.warmup = min(args.batch, 4), min(args.steps, 2), min(args.warmup, 1)
    distributed.COMPILE_BACKEND = "aot_eager"  # the same tracing and autograd graph, without a C++/Triton build
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

vit = ({"name": "vit", "size": "nano", "image_size": 32, "patch_size": 8} if args.tiny else
       {"name": "vit", "size": "base", "image_size": 224, "patch_size": 16})
ROWS = {  # MAE: the paper's ViT-B recipe (decoder 512 wide, 8 blocks, 16 heads; normalised pixels)
    "mae-vit-b16": (dict(vit, global_pool="avg"),
                    {"name": "mae", "mask_ratio": 0.75, "norm_pix_loss": True,
                     **({"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2} if args.tiny else
                        {"decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16})}),
    "supervised-vit-b16": (vit, {"name": "supervised"}),
}


def sync():
    if cuda:
        torch.cuda.synchronize()


def views_seconds(model, images: torch.Tensor, where: torch.device) -> float:
    """Seconds for one batch's views made on ``where`` and moved to the training device (mean of 3)."""
    model.views(images.to(where), torch.Generator().manual_seed(9))  # warm-up
    sync()
    t0 = time.perf_counter()
    for i in range(3):
        [v.to(dev, non_blocking=True) for v in model.views(images.to(where), torch.Generator().manual_seed(i))]
    sync()
    return (time.perf_counter() - t0) / 3


out = Path(args.out)
out.parent.mkdir(parents=True, exist_ok=True)
result = {"device": name, "bf16_peak_tflops": peak, "torch": torch.__version__, "tiny": args.tiny,
          "compile": not args.no_compile, "batch": args.batch, "steps": args.steps, "rows": {}}
for row, (arch, objective) in ROWS.items():
    recipe = validate({"architecture": arch, "data": {"name": "fractals"}, "objective": objective,
                       "optim": {"batch_size": args.batch, "lr": 1.5e-4},
                       "run": {"precision": "bf16", "compile": not args.no_compile}})
    torch.manual_seed(0)
    model = OBJECTIVES.get(objective["name"])(backbone=build.backbone(recipe.architecture), num_classes=1000,
                                              **recipe.objective.kwargs).to(dev).train()
    net = distributed.wrap(model, recipe.run, dev, 1)  # run.compile, as the trainer applies it
    opt = build.optimizer(model, recipe.optim)
    dtype = build.autocast_dtype(recipe.run, dev)
    side = recipe.architecture.kwargs["image_size"]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 3, side, side), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 1000, (args.batch,), generator=g).to(dev)
    views = [v.to(dev) for v in model.views(images, torch.Generator().manual_seed(0))]
    n = min(args.batch, 8)  # FLOPs are linear in the batch: counted on a slice, eagerly
    gflop = flops.train_step_flops(model, [v[:n] for v in views], labels[:n]) / 1e9 * args.batch / n
    t0 = time.perf_counter()
    for i in range(args.warmup):  # compilation happens here
        train_step(net, opt, views, labels, grad_clip=recipe.optim.grad_clip, dtype=dtype)
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):  # the device's work: the step on views already there
        train_step(net, opt, views, labels, grad_clip=recipe.optim.grad_clip, dtype=dtype)
    sync()
    step_s = (time.perf_counter() - t0) / args.steps
    views_dev_s = views_seconds(model, images, dev)  # as the trainer makes them: uint8 copied over, augmented there
    views_host_s = views_seconds(model, images, torch.device("cpu"))  # for reference: on the host, then copied
    tflops = gflop / step_s / 1e3
    figures = {"images_per_s": round(args.batch / step_s, 1), "step_s": round(step_s, 4),
               "gflop_per_step": round(gflop, 1), "tflops": round(tflops, 2),
               "mfu": round(tflops / peak, 4) if peak else None, "warmup_s": round(warm_s, 1),
               "views_s": round(views_dev_s, 4), "host_views_s": round(views_host_s, 4),
               "peak_memory_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if cuda else None,
               "autocast": str(dtype).removeprefix("torch.")}
    result["rows"][row] = figures
    out.write_text(json.dumps(result, indent=1) + "\n")
    mfu = f"MFU {100 * figures['mfu']:.1f}% of {peak} TFLOP/s" if peak else "MFU unknown (pass --peak-tflops)"
    print(f"{row:<20} {name}: {figures['images_per_s']:8.1f} img/s, {tflops:7.2f} TFLOP/s, {mfu} "
          f"(batch {args.batch}, bf16, compile {'off' if args.no_compile else 'on'}, warm-up {warm_s:.0f} s; "
          f"a batch's views: {views_dev_s:.4f} s as the trainer makes them, {views_host_s:.3f} s on the host)",
          flush=True)
    distributed.unwrap(net, model)
    del model, net, opt
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
print(f"wrote {out}")
EOF
