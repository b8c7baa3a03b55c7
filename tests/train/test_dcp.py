"""Sharded (torch.distributed.checkpoint) checkpoints, written and read in one process here (the
multi-process runs are in test_distributed.py): the same atomic folder scheme and checksums as the
safetensors ones, an exact restore of weights, optimizer and RNG, and a metadata file that is
never unpickled beyond DCP's own classes."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from bigmodel.train import checkpoint


def _model_and_opt(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _trained(steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer]:
    model, opt = _model_and_opt(0)
    for _ in range(steps):
        model(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_a_sharded_checkpoint_restores_weights_optimizer_and_rng(tmp_path: Path):
    model, opt = _trained()
    torch.manual_seed(42)
    saved = checkpoint.save_sharded(tmp_path, 7, model, opt, {"recipe": {"what": "toy"}})
    rng_after_save = torch.rand(3)
    assert saved == tmp_path / "step_00000007" and checkpoint.is_sharded(saved)
    meta = checkpoint.load_meta(saved)
    assert (meta["step"], meta["format"], meta["world"], meta["recipe"]) == (7, "dcp", 1, {"what": "toy"})
    assert set(meta["files"]) == {".metadata", "__0_0.distcp", "rng-00000.pt"}
    assert all(set(v) == {"bytes", "sha256"} for v in meta["files"].values())
    assert checkpoint.latest(tmp_path) == saved and not list(tmp_path.glob(".tmp-*"))

    fresh, fresh_opt = _model_and_opt(1)
    assert checkpoint.restore(saved, fresh, fresh_opt, seed=0) == 7
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key])
    assert torch.equal(torch.rand(3), rng_after_save)  # the RNG continues where the saving process was
    assert fresh_opt.param_groups[0]["lr"] == 0.1


def test_read_weights_gives_the_model_part_on_one_process(tmp_path: Path):
    model, opt = _trained()
    saved = checkpoint.save_sharded(tmp_path, 1, model, opt, {})
    assert {k: v.shape for k, v in checkpoint.read_weights(saved).items()} == {k: v.shape for k, v in model.state_dict().items()}
    first = nn.Linear(4, 8)
    checkpoint.load_weights(saved, first, prefix="0.")
    assert torch.equal(first.weight, model[0].weight)
    with pytest.raises(checkpoint.CheckpointError, match="lacks weights the model needs: 0.weight"):
        checkpoint.load_weights(saved, nn.Sequential(nn.Linear(4, 8)), prefix="1.")


def test_a_damaged_shard_is_named_and_the_previous_checkpoint_used(tmp_path: Path):
    model, opt = _trained()
    checkpoint.save_sharded(tmp_path, 1, model, opt, {})
    last = checkpoint.save_sharded(tmp_path, 2, model, opt, {})
    shard = last / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    warnings: list[str] = []
    assert checkpoint.latest(tmp_path, warn=warnings.append).name == "step_00000001"
    assert "__0_0.distcp fails its sha256 check" in warnings[0]
    (tmp_path / "step_00000001" / "rng-00000.pt").unlink()
    assert checkpoint.problem(tmp_path / "step_00000001") == "rng-00000.pt is missing"
    with pytest.raises(checkpoint.CheckpointError, match="and 1 older, all damaged"):
        checkpoint.latest(tmp_path)


def test_a_half_written_checkpoint_is_never_loaded_and_the_next_save_clears_it(tmp_path: Path):
    model, opt = _trained()
    first = checkpoint.save_sharded(tmp_path, 1, model, opt, {})
    half = tmp_path / ".tmp-step_00000002"
    shutil.copytree(first, half)
    (half / "meta.json").unlink()  # killed before rank 0's rename
    assert checkpoint.latest(tmp_path) == first
    checkpoint.save_sharded(tmp_path, 3, model, opt, {}, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_holding_anything_but_dcp_classes_is_refused(tmp_path: Path, monkeypatch):
    model, opt = _trained()
    saved = checkpoint.save_sharded(tmp_path, 1, model, opt, {})
    (saved / ".metadata").write_bytes(pickle.dumps(_Evil()))
    meta = json.loads((saved / "meta.json").read_text())
    meta["files"].pop(".metadata")  # even with the checksum out of the way
    (saved / "meta.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="posix.system is not part of a checkpoint's metadata"):
        checkpoint.read_weights(saved)
    assert not (tmp_path / "pwned").exists()
