"""precision: bf16 units detected from torch's probes or /proc/cpuinfo (not the capability string);
``auto`` follows them; deterministic kernels inside :func:`precision.deterministic` only."""

from __future__ import annotations

import os

import pytest
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


def test_deterministic_turns_torchs_mode_on_inside_and_restores_the_callers(monkeypatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with precision.deterministic(False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # off: nothing touched
    with precision.deterministic(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # a user's own setting is kept
    torch.use_deterministic_algorithms(True, warn_only=True)  # and so is a caller's mode
    try:
        with pytest.raises(RuntimeError, match="boom"), precision.deterministic(True):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
            raise RuntimeError("boom")
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(False)
