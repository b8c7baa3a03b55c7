"""Sharded (torch.distributed.checkpoint) checkpoints, written and read in one process here (the
multi-process runs are in test_distributed.py): the same atomic folder scheme and checksums as the
safetensors ones, an exact restore of weights, optimizer and RNG, and a metadata file that is
never unpickled beyond DCP's own classes."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint import metadata as dcp_metadata

from bigmodel.train import checkpoint, dcp


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
    shapes = {k: v.shape for k, v in checkpoint.read_weights(saved).items()}
    assert shapes == {k: v.shape for k, v in model.state_dict().items()}
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


# -- a checkpoint folder is untrusted input (issue 17): .metadata is checked before DCP reads anything


def _rewrite_metadata(ckpt: Path, edit, extra: dict[str, bytes] | None = None) -> None:
    """Unpickle ``ckpt/.metadata``, let ``edit`` change it, write it back, and record it (and the
    ``extra`` files written beside it) in meta.json with true sizes and sha256, as a forger would:
    checksums are no defence against someone who writes the folder."""
    with open(ckpt / ".metadata", "rb") as f:
        md = dcp._MetadataUnpickler(f).load()
    edit(md)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    for name, data in (extra or {}).items():
        (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "meta.json").read_text())
    for name in [".metadata", *(extra or {})]:
        data = (ckpt / name).read_bytes()
        meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def _storage(md, fqn: str):
    return next(k for k in md.storage_data if k.fqn == fqn)


def _point_at(fqn: str, path: str):
    def edit(md):
        key = _storage(md, fqn)
        md.storage_data[key] = dataclasses.replace(md.storage_data[key], relative_path=path)
    return edit


@pytest.fixture()
def two_checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """A run's sharded checkpoint ``run/step_00000001`` and, outside that folder, a sibling whose
    shard file holds the same layout with other values (a file a forged path could reach)."""
    model, opt = _trained()
    ckpt = checkpoint.save_sharded(tmp_path / "run", 1, model, opt, {})
    other, other_opt = _trained(steps=5)
    checkpoint.save_sharded(tmp_path / "outside", 1, other, other_opt, {})
    return ckpt, tmp_path / "outside" / "step_00000001"


@pytest.mark.parametrize("where", ["absolute", "dotdot", "unlisted"])
def test_metadata_naming_a_file_outside_the_checkpoint_is_refused(two_checkpoints, where: str):
    ckpt, outside = two_checkpoints
    if where == "unlisted":  # inside the folder, but not one of the files meta.json records
        shutil.copy(outside / "__0_0.distcp", ckpt / "__0_1.distcp")
    path = {"absolute": str(outside / "__0_0.distcp"), "dotdot": "../../outside/step_00000001/__0_0.distcp",
            "unlisted": "__0_1.distcp"}[where]
    _rewrite_metadata(ckpt, _point_at("model.0.weight", path))
    assert checkpoint.problem(ckpt) is None  # the checksums agree: only the check below stands in the way
    for read in (lambda: checkpoint.read_weights(ckpt), lambda: checkpoint.restore(ckpt, *_model_and_opt(1))):
        with pytest.raises(checkpoint.CheckpointError) as e:
            read()
        assert str(e.value) == (f"{ckpt}/.metadata: entry 'model.0.weight' names the file {path!r}, which is not one "
                                f"of the checkpoint's files; refusing to load it (a bigmodel checkpoint names only "
                                f"its own files, within their recorded sizes)")


def test_metadata_reading_past_the_end_of_a_file_is_refused(two_checkpoints):
    ckpt, _ = two_checkpoints
    size = (ckpt / "__0_0.distcp").stat().st_size

    def edit(md):
        key = _storage(md, "model.0.bias")
        md.storage_data[key] = dataclasses.replace(md.storage_data[key], offset=size - 10, length=1 << 40)
    _rewrite_metadata(ckpt, edit)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read_weights(ckpt)
    assert str(e.value).startswith(f"{ckpt}/.metadata: entry 'model.0.bias' reads bytes {size - 10}..{size - 10}"
                                   f"+{1 << 40} of __0_0.distcp, which holds {size} bytes; refusing to load it")


@pytest.mark.parametrize("chunk_too", [False, True])
def test_metadata_claiming_a_huge_tensor_is_refused_before_allocating_it(two_checkpoints, chunk_too: bool):
    """A 4 TiB claim: refused from the checkpoint's own sizes, never handed to ``torch.empty``."""
    ckpt, _ = two_checkpoints
    huge = torch.Size([1 << 20, 1 << 20])

    def edit(md):
        entry = md.state_dict_metadata["model.0.weight"]
        entry.size = huge
        if chunk_too:
            entry.chunks[0].sizes = huge
            md.storage_data.pop(_storage(md, "model.0.weight"))
            md.storage_data[dcp_metadata.MetadataIndex("model.0.weight", entry.chunks[0].offsets)] = \
                next(iter(md.storage_data.values()))
    _rewrite_metadata(ckpt, edit)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read_weights(ckpt)
    what = (": its chunk at (0, 0) (4398046511104 bytes) is not stored" if chunk_too else
            " claims a tensor of size (1048576, 1048576) (4398046511104 bytes), more than its stored chunks hold "
            "(128 bytes)")
    assert str(e.value).startswith(f"{ckpt}/.metadata: entry 'model.0.weight'{what}; refusing to load it")


class _Pwn:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-bytes",))


def test_bytes_entries_never_reach_an_unpickler(two_checkpoints, tmp_path: Path, monkeypatch):
    """DCP loads a ``BytesStorageMetadata`` entry with ``torch.load(weights_only=False)``: any
    object, any code. A bigmodel checkpoint holds tensors only, so such an entry is refused by the
    metadata check, and behind it the tensor-only filters of read_weights and restore stay. The
    payload is live: with every guard removed, loading it runs its command."""
    ckpt, _ = two_checkpoints
    payload = io.BytesIO()
    torch.save(_Pwn(), payload)

    def edit(md):
        md.state_dict_metadata["model.0.weight"] = dcp_metadata.BytesStorageMetadata()
        key = _storage(md, "model.0.weight")
        md.storage_data.pop(key)
        md.storage_data[dcp_metadata.MetadataIndex("model.0.weight")] = dataclasses.replace(
            md.storage_data[_storage(md, "model.0.bias")], relative_path="__0_1.distcp", offset=0,
            length=len(payload.getvalue()))
    _rewrite_metadata(ckpt, edit, extra={"__0_1.distcp": payload.getvalue()})
    monkeypatch.chdir(tmp_path)
    refusal = (f"{ckpt}/.metadata: entry 'model.0.weight' is not a tensor (BytesStorageMetadata); a bigmodel "
               f"checkpoint saves tensors only; refusing to load it")
    for read in (lambda: checkpoint.read_weights(ckpt), lambda: checkpoint.restore(ckpt, *_model_and_opt(1))):
        with pytest.raises(checkpoint.CheckpointError) as e:
            read()
        assert str(e.value).startswith(refusal)
    # behind the metadata check: read_weights leaves the entry out, restore refuses non-tensors
    monkeypatch.setattr(dcp, "check", lambda *a: None)
    with pytest.raises(checkpoint.CheckpointError, match="lacks weights the model needs: 0.weight"):
        checkpoint.load_weights(ckpt, _model_and_opt(1)[0])
    with pytest.raises(checkpoint.CheckpointError, match="missing or not tensors: non-tensor entries"):
        checkpoint.restore(ckpt, *_model_and_opt(1))
    assert not (tmp_path / "pwned-by-bytes").exists()
    # every guard removed: DCP unpickles the entry and runs the command
    monkeypatch.setattr(dcp, "_is_tensor", lambda entry: True)
    with contextlib.suppress(BaseException):
        checkpoint.restore(ckpt, *_model_and_opt(1))
    assert (tmp_path / "pwned-by-bytes").exists()


def test_malformed_metadata_is_one_line_not_a_traceback(two_checkpoints):
    ckpt, _ = two_checkpoints

    def edit(md):
        md.state_dict_metadata["model.0.weight"].size = 7  # not a shape
    _rewrite_metadata(ckpt, edit)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.read_weights(ckpt)
    assert str(e.value) == (f"{ckpt}/.metadata: malformed (TypeError: 'int' object is not iterable); "
                            f"refusing to load it")
