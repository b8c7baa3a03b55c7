"""Numerics of a training step: which autocast dtype it runs under (``fp32``, ``bf16``, or ``auto``:
bf16 where it pays), and whether it runs deterministic kernels (:func:`deterministic`).

``auto`` takes bf16 on hardware with native bf16 matrix units:

- CUDA: bf16 where the GPU supports it (``torch.cuda.is_bf16_supported()``: Ampere and later).
- CPU: bf16 dot-product instructions — AMX (``amx_bf16``) or AVX-512 BF16 (:func:`cpu_bf16`).
  ``torch.backends.cpu.get_cpu_capability()`` cannot tell: it names the vector instruction set
  only (``AVX512`` on AMX machines too), so this asks torch's cpuinfo probes
  (``torch.cpu._is_amx_tile_supported``, ``_is_avx512_bf16_supported``) and falls back to the
  flags of ``/proc/cpuinfo``. That the rule pays is measured by ``benchmarks/peers.py``, which
  times exactly this choice (figures: ``benchmarks/results/peers.md``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# cuBLAS is deterministic with a fixed workspace per stream; torch's deterministic mode refuses a matrix
# product on CUDA unless this is one of ":4096:8" or ":16:8" (PyTorch's "Reproducibility" notes)
CUBLAS_WORKSPACE = ":4096:8"


def autocast_dtype(precision: str, dev: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked, or under ``auto`` where the hardware has native bf16 units (see
    the module docstring); ``None`` means plain fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        return None
    if dev.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if dev.type == "cpu" and cpu_bf16() else None


@contextlib.contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """While inside, with ``on``: ``torch.use_deterministic_algorithms(True)`` (and cuBLAS's fixed
    workspace), so that two runs of a step on one GPU give the same bits; the previous setting is
    restored on leaving. Without it, GPU kernels that accumulate with atomics (a convolution's weight
    gradient, scatter-adds in the backward of gathers and of routing) sum in a varying order, and a
    stopped-and-resumed run, like any second run, differs in the last bits (measured on an H200:
    benchmarks/results/gpu.md). On the CPU every kernel used here is deterministic already, and this
    changes nothing. An op with no deterministic kernel then raises, naming itself."""
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


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
