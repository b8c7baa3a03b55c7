"""precision: bf16 units detected from torch's probes or /proc/cpuinfo (not the capability string),
``auto`` measured once per machine and shape and cached, without side effects on the model."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from bigmodel.train import precision

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("BIGMODEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


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


def test_auto_follows_the_hardware_without_a_model(monkeypatch) -> None:
    assert precision.autocast_dtype("bf16", CPU) is torch.bfloat16
    assert precision.autocast_dtype("fp32", CPU) is None
    _units(monkeypatch, amx=False, avx512_bf16=True)
    assert precision.autocast_dtype("auto", CPU) is torch.bfloat16
    _units(monkeypatch, amx=False, avx512_bf16=False)
    assert precision.autocast_dtype("auto", CPU) is None


class Toy(nn.Module):
    """An objective-like module with state a careless probe would change: BatchNorm statistics,
    dropout (global RNG), gradients."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.Dropout(0.5), nn.Linear(width, 1))

    def forward(self, views, labels):
        return {"loss": self.net(views[0]).float().square().mean()}


def _batch(n: int = 16, width: int = 8):
    return [torch.randn(n, width)], torch.zeros(n, dtype=torch.long)


def test_measured_once_per_machine_and_shape(monkeypatch, cache_dir) -> None:
    model, (views, labels) = Toy(), _batch()
    calls = []

    def timer(seconds):
        def time_step(dtype):
            calls.append(dtype)
            return seconds["bf16" if dtype is torch.bfloat16 else "fp32"]
        return time_step

    assert precision.measured_choice(model, views, labels, timer({"fp32": 1.0, "bf16": 0.5})) is torch.bfloat16
    measured = len(calls)
    assert measured >= 4 and calls.count(None) == calls.count(torch.bfloat16)
    # cached: the same machine and shape are not measured again, whatever a new measurement would say
    assert precision.measured_choice(model, views, labels, timer({"fp32": 0.5, "bf16": 1.0})) is torch.bfloat16
    assert len(calls) == measured
    entry, = json.loads((cache_dir / "precision.json").read_text()).values()
    assert entry["choice"] == "bf16" and entry["fp32_s"] == 1.0 and entry["bf16_s"] == 0.5
    assert "Toy" in entry["shape"] and "(16, 8)" in entry["shape"] and "threads" in entry["machine"]
    # another shape is measured on its own; bf16 must win by the margin, not by a hair
    views2, labels2 = _batch(n=32)
    assert precision.measured_choice(model, views2, labels2, timer({"fp32": 1.0, "bf16": 0.98})) is None
    assert len(calls) > measured
    assert len(json.loads((cache_dir / "precision.json").read_text())) == 2
    # another thread count is another machine setting
    monkeypatch.setattr(torch, "get_num_threads", lambda: 97)
    assert precision.measured_choice(model, views, labels, timer({"fp32": 0.5, "bf16": 1.0})) is None


def test_auto_with_a_model_times_a_copy_and_leaves_it_untouched(monkeypatch, cache_dir) -> None:
    _units(monkeypatch, amx=False, avx512_bf16=True)
    torch.manual_seed(0)
    model, (views, labels) = Toy(), _batch()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    got = precision.autocast_dtype("auto", CPU, model, views, labels)
    assert got in (torch.bfloat16, None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # BN statistics too
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    entry, = json.loads((cache_dir / "precision.json").read_text()).values()
    assert entry["choice"] == ("bf16" if got is torch.bfloat16 else "fp32") and entry["fp32_s"] > 0
    # no bf16 unit: fp32, nothing measured
    _units(monkeypatch, amx=False, avx512_bf16=False)
    assert precision.autocast_dtype("auto", CPU, model, *_batch(n=4)) is None
    assert len(json.loads((cache_dir / "precision.json").read_text())) == 1


def test_an_unreadable_or_unwritable_cache_is_no_error(monkeypatch, cache_dir) -> None:
    cache_dir.mkdir()
    (cache_dir / "precision.json").write_text("{not json")
    model, (views, labels) = Toy(), _batch()
    assert precision.measured_choice(model, views, labels, lambda d: 0.1 if d else 1.0) is torch.bfloat16
    monkeypatch.setenv("BIGMODEL_CACHE", "/proc/no-such-place")
    assert precision.measured_choice(model, views, labels, lambda d: 0.1 if d else 1.0) is torch.bfloat16
