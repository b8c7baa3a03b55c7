"""precision: bf16 units detected from torch's probes or /proc/cpuinfo (not the capability string);
``auto`` follows them."""

from __future__ import annotations

import torch

from bigmodel.train import precision

CPU = torch.device("cpu")


def _units(monkeypatch, amx: bool | None, avx512_bf16: bool | None, flags: str = "") -> None:
    """Fake torch's probes (``None``: this torch lacks it) and the cpuinfo flags."""
    for name, value in (("_is_amx_tile_supported", amx), ("_is_avx512_bf16_supported", avx512_bf16)):
        if value is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda v=value: v, raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: set(flags.split()))
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # what AMX machines say too


def test_bf16_units_from_torchs_probes_or_cpuinfo(monkeypatch) -> None:
    _units(monkeypatch, amx=True, avx512_bf16=True)
    assert precision.cpu_bf16() == "amx"
    _units(monkeypatch, amx=False, avx512_bf16=True)
    assert precision.cpu_bf16() == "avx512_bf16"
    _units(monkeypatch, amx=False, avx512_bf16=False, flags="avx512f amx_bf16 amx_tile")  # the probes win
    assert precision.cpu_bf16() is None
    _units(monkeypatch, amx=None, avx512_bf16=None, flags="fpu avx512f amx_bf16 amx_tile avx512_bf16")
    assert precision.cpu_bf16() == "amx"
    _units(monkeypatch, amx=None, avx512_bf16=None, flags="fpu avx2 avx512f")
    assert precision.cpu_bf16() is None


def test_auto_follows_the_hardware(monkeypatch) -> None:
    assert precision.autocast_dtype("bf16", CPU) is torch.bfloat16
    assert precision.autocast_dtype("fp32", CPU) is None
    _units(monkeypatch, amx=False, avx512_bf16=True)
    assert precision.autocast_dtype("auto", CPU) is torch.bfloat16
    _units(monkeypatch, amx=False, avx512_bf16=False)
    assert precision.autocast_dtype("auto", CPU) is None
