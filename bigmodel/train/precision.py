"""Which autocast dtype a step runs under: ``fp32``, ``bf16``, or ``auto`` (bf16 where it pays)."""

from __future__ import annotations

import torch


def autocast_dtype(precision: str, dev: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked, or under ``auto`` where the hardware has fast bf16 matmuls
    (CUDA with bf16 support, or a CPU with AMX); ``None`` means plain fp32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if dev.type == "cpu" and "AMX" in torch.backends.cpu.get_cpu_capability().upper():
            return torch.bfloat16
    return None
