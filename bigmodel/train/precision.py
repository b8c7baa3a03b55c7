"""Which autocast dtype a step runs under: ``fp32``, ``bf16``, or ``auto`` (bf16 where it pays).

``auto`` takes bf16 only on hardware with native bf16 matrix units, and on a CPU only where the
training step measures faster in bf16:

- CUDA: bf16 where the GPU supports it (``torch.cuda.is_bf16_supported()``: Ampere and later).
- CPU: bf16 dot-product instructions are needed — AMX (``amx_bf16``) or AVX-512 BF16
  (:func:`cpu_bf16`). ``torch.backends.cpu.get_cpu_capability()`` cannot tell: it names the
  vector instruction set only (``AVX512`` on AMX machines too), so this asks torch's cpuinfo
  probes (``torch.cpu._is_amx_tile_supported``, ``_is_avx512_bf16_supported``) and falls back to
  the flags of ``/proc/cpuinfo``. On such a CPU, given the model and one batch of its views,
  :func:`measured_choice` times forward + backward both ways on a copy of the model and keeps
  bf16 only if it is at least :data:`MARGIN` faster; the answer is cached per machine (CPU model,
  bf16 units, torch version, threads) and shape (model classes, parameter count, view shapes) in
  ``~/.cache/bigmodel/precision.json`` (``$BIGMODEL_CACHE`` or ``$XDG_CACHE_HOME/bigmodel`` when
  set), so it is measured once. Without a model the rule is bf16 on such a CPU, which
  measurements confirm here (AVX-512 BF16, 2 threads: the step 1.2-1.8x faster in bf16 for every zoo
  recipe, 1.3-2.1x for every row of ``benchmarks/peers.py``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

MARGIN = 0.05  # bf16 must save at least this share of the fp32 step time to be chosen


def autocast_dtype(precision: str, dev: torch.device, model: nn.Module | None = None,
                   views: list[torch.Tensor] | None = None,
                   labels: torch.Tensor | None = None) -> torch.dtype | None:
    """bf16 autocast when asked, or under ``auto`` where it pays (see the module docstring);
    ``None`` means plain fp32.

    Args:
        precision: ``fp32``, ``bf16`` or ``auto``.
        dev: the device the step runs on.
        model, views, labels: the objective and one batch of its views (on ``dev``): with them,
            ``auto`` on a CPU measures the step both ways (once per machine and shape, cached);
            without, it follows the hardware rule. The model, its gradients and the RNG are left
            as they were.
    """
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        return None
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if dev.type != "cpu" or not cpu_bf16():
        return None
    if model is None or views is None or labels is None:
        return torch.bfloat16
    return _agree(measured_choice(model, views, labels), dev)


def cpu_bf16() -> str | None:
    """The CPU's native bf16 dot-product unit: ``"amx"``, ``"avx512_bf16"``, or ``None``. torch's
    cpuinfo probes where this torch has them (they also check that the OS enables AMX tiles), else
    the flags of ``/proc/cpuinfo``."""
    for unit, probe, flag in (("amx", "_is_amx_tile_supported", "amx_bf16"),
                              ("avx512_bf16", "_is_avx512_bf16_supported", "avx512_bf16")):
        has = getattr(torch.cpu, probe, None)
        if (has() if has is not None else flag in cpu_flags()):
            return unit
    return None


def cpu_flags() -> set[str]:
    """The ``flags`` of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return set()
    return set(line.partition(":")[2].split())


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.partition(":")[2].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def cache_file() -> Path:
    root = os.environ.get("BIGMODEL_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bigmodel"
    return Path(root) / "precision.json"


def machine_key() -> str:
    return f"{cpu_name()} | bf16 unit {cpu_bf16()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def shape_key(model: nn.Module, views: list[torch.Tensor], labels: torch.Tensor) -> str:
    """The model's classes (and its backbone's), parameter count and the batch's shapes."""
    names = [type(model).__name__]
    if isinstance(getattr(model, "backbone", None), nn.Module):
        names.append(type(model.backbone).__name__)
    params = sum(p.numel() for p in model.parameters())
    shapes = [f"{tuple(v.shape)}:{str(v.dtype).removeprefix('torch.')}" for v in views]
    return f"{'/'.join(names)} | {params} params | views {', '.join(shapes)} | labels {tuple(labels.shape)}"


def measured_choice(model: nn.Module, views: list[torch.Tensor], labels: torch.Tensor,
                    time_step: Callable[[torch.dtype | None], float] | None = None) -> torch.dtype | None:
    """bf16 if one forward + backward of ``model`` on ``views`` is at least :data:`MARGIN` faster
    under bf16 autocast than in fp32, else ``None``; from the cache when this machine measured
    this shape before, else measured now (:func:`time_steps`, or ``time_step(dtype) -> seconds``)
    and cached."""
    key = hashlib.sha256(f"{machine_key()} || {shape_key(model, views, labels)}".encode()).hexdigest()[:16]
    cache = _read(cache_file())
    if key in cache and cache[key].get("choice") in ("bf16", "fp32"):
        return torch.bfloat16 if cache[key]["choice"] == "bf16" else None
    times = time_steps(model, views, labels) if time_step is None else _alternate(time_step)
    choice = "bf16" if times["bf16"] <= (1 - MARGIN) * times["fp32"] else "fp32"
    cache[key] = {"choice": choice, "fp32_s": round(times["fp32"], 5), "bf16_s": round(times["bf16"], 5),
                  "machine": machine_key(), "shape": shape_key(model, views, labels),
                  "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    _write(cache_file(), cache)
    return torch.bfloat16 if choice == "bf16" else None


def time_steps(model: nn.Module, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """Median seconds of a forward + backward of a copy of ``model`` in fp32 and under bf16
    autocast, alternating, after a warm-up of each. The model, its gradients and the RNG state
    are untouched (the copy is discarded; the RNG is forked)."""
    twin = copy.deepcopy(model).train()
    devices = [v.device for v in views if v.device.type == "cuda"]

    def step(dtype: torch.dtype | None) -> float:
        t = time.perf_counter()
        with torch.autocast(views[0].device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out = twin(list(views), labels)
        out["loss"].backward()
        twin.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    with torch.random.fork_rng(devices=devices):
        return _alternate(step)


def _alternate(step: Callable[[torch.dtype | None], float], reps: int = 3) -> dict[str, float]:
    """Warm up both, then ``reps`` timings of each in alternating order; the medians."""
    step(None)
    step(torch.bfloat16)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for i in range(reps):
        for name in (("fp32", "bf16") if i % 2 == 0 else ("bf16", "fp32")):
            times[name].append(step(torch.bfloat16 if name == "bf16" else None))
    return {name: statistics.median(t) for name, t in times.items()}


def _agree(dtype: torch.dtype | None, dev: torch.device) -> torch.dtype | None:
    """Every rank of a distributed run takes rank 0's choice (each measured on its own)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dtype
    flag = torch.tensor([int(dtype is not None)], device=dev)
    dist.broadcast(flag, src=0)
    return torch.bfloat16 if int(flag) else None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    """Atomically (a temp file renamed over it); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".precision-", suffix=".json")
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
