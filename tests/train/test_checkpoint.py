"""Checkpoint integrity (sizes and sha256 in meta.json, fallback past a damaged checkpoint) and
strict weight loading (only the ``drop`` prefixes may be missing or extra)."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from bigmodel.errors import CheckpointError, DiskFull
from bigmodel.train import checkpoint


class Net(torch.nn.Module):
    """A backbone and a head, named like an objective's state dict."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 4))
        self.head = torch.nn.Linear(4, 2)


def saved(tmp_path: Path, steps: tuple[int, ...] = (2, 4), keep: int = 5) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model, folder = Net(), tmp_path / "checkpoints"
    for step in steps:
        checkpoint.save(folder, step, model, {"step": step}, {"recipe": {}}, keep=keep)
    return folder, model


def test_meta_records_size_and_sha256_of_each_file(tmp_path) -> None:
    folder, _ = saved(tmp_path, (2,))
    meta = checkpoint.load_meta(folder / "step_00000002")
    for name in ("model.safetensors", "state.pt"):
        data = (folder / "step_00000002" / name).read_bytes()
        assert meta["files"][name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(("name", "damage", "why"), [
    ("model.safetensors", lambda b: b[: len(b) // 2], "model.safetensors has"),  # truncated
    ("state.pt", lambda b: bytes(len(b)), "state.pt fails its sha256 check"),  # same size, garbage
])
def test_damaged_latest_falls_back_to_the_newest_intact_one(tmp_path, name, damage, why) -> None:
    folder, _ = saved(tmp_path, (2, 4, 6))
    path = folder / "step_00000006" / name
    path.write_bytes(damage(path.read_bytes()))
    warnings: list[str] = []
    assert checkpoint.latest(tmp_path, warn=warnings.append) == folder / "step_00000004"
    assert len(warnings) == 1 and why in warnings[0] and "step_00000006" in warnings[0]
    assert "using step_00000004 instead" in warnings[0]
    assert (folder / "step_00000006" / name).exists()  # nothing deleted


def test_no_intact_checkpoint_is_one_error_and_deletes_nothing(tmp_path) -> None:
    folder, _ = saved(tmp_path, (2, 4))
    before = {}
    for ckpt in ("step_00000002", "step_00000004"):
        path = folder / ckpt / "model.safetensors"
        path.write_bytes(b"garbage")
        before[path] = path.read_bytes()
    with pytest.raises(CheckpointError) as err:
        checkpoint.latest(tmp_path)
    assert str(err.value).startswith(f"checkpoint {folder / 'step_00000004'}: model.safetensors has 7 bytes, ")
    assert "(and 1 older, all damaged)" in str(err.value)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002", "step_00000004"]


def test_a_named_damaged_checkpoint_folder_is_an_error_not_a_fallback(tmp_path) -> None:
    folder, _ = saved(tmp_path, (2, 4))
    (folder / "step_00000004" / "state.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="state.pt has 0 bytes"):
        checkpoint.latest(folder / "step_00000004")


def test_checkpoints_saved_without_checksums_still_load(tmp_path) -> None:
    folder, model = saved(tmp_path, (2,))
    meta_path = folder / "step_00000002" / "meta.json"
    meta = json.loads(meta_path.read_text())
    del meta["files"]  # as written before checksums were recorded
    meta_path.write_text(json.dumps(meta))
    assert checkpoint.latest(tmp_path, warn=pytest.fail) == folder / "step_00000002"
    fresh = Net()
    checkpoint.load_weights(folder / "step_00000002", fresh)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values(), strict=True))


def test_save_never_prunes_the_checkpoint_it_just_wrote(tmp_path) -> None:
    # a run that fell back from a damaged step_6 to step_4 saves step_5 next: with keep=1 the old
    # rule (keep the newest names) deleted step_5 and kept only the damaged step_6
    folder, model = saved(tmp_path, (4, 6), keep=5)
    checkpoint.save(folder, 5, model, {"step": 5}, {}, keep=1)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000005", "step_00000006"]


def test_load_weights_refuses_a_checkpoint_missing_backbone_weights(tmp_path) -> None:
    folder, _ = saved(tmp_path, (2,))
    path = folder / "step_00000002" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path))
    del weights["backbone.1.weight"]
    save_file(weights, str(path))
    with pytest.raises(CheckpointError) as err:
        checkpoint.load_weights(folder / "step_00000002", Net(), drop=("head.",))
    assert "lacks weights the model needs: backbone.1.weight (1 in all)" in str(err.value)
    with pytest.raises(CheckpointError,
                       match=r"lacks weights the model needs: 1.weight \(1 in all, prefix 'backbone.'\)"):
        checkpoint.load_weights(folder / "step_00000002", Net().backbone, prefix="backbone.")


def test_load_weights_with_only_the_dropped_head_missing_loads(tmp_path) -> None:
    folder, model = saved(tmp_path, (2,))
    path = folder / "step_00000002" / "model.safetensors"
    from safetensors.torch import load_file, save_file

    weights = {k: v for k, v in load_file(str(path)).items() if not k.startswith("head.")}
    save_file(weights, str(path))
    torch.manual_seed(1)
    fresh = Net()
    head = {k: v.clone() for k, v in fresh.head.state_dict().items()}
    checkpoint.load_weights(folder / "step_00000002", fresh, drop=("head.",))
    assert all(torch.equal(fresh.backbone.state_dict()[k], v) for k, v in model.backbone.state_dict().items())
    assert all(torch.equal(fresh.head.state_dict()[k], v) for k, v in head.items())  # left as it was
    with pytest.raises(CheckpointError, match="lacks weights the model needs: head.weight, head.bias"):
        checkpoint.load_weights(folder / "step_00000002", Net())  # without drop the head is required


def test_load_weights_refuses_unexpected_weights_outside_drop(tmp_path) -> None:
    folder, _ = saved(tmp_path, (2,))
    trunk = Net()
    del trunk.head  # a model without the checkpoint's head
    with pytest.raises(CheckpointError,
                       match=r"holds weights the model does not have: head.bias, head.weight \(2 in all\)"):
        checkpoint.load_weights(folder / "step_00000002", trunk)
    checkpoint.load_weights(folder / "step_00000002", trunk, drop=("head.",))


# -- a full disk (issue 17): one line, the partial folder removed, the previous checkpoint intact ----


def _fill_disk_at(monkeypatch, name: str) -> None:
    """``checkpoint._write`` writes half of file ``name`` and then fails as a full disk does."""
    real = checkpoint._write

    def write(path: Path, data: bytes) -> None:
        if path.name == name:
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)
    monkeypatch.setattr(checkpoint, "_write", write)


def test_a_disk_that_fills_mid_write_is_one_error_and_loses_nothing(tmp_path, monkeypatch) -> None:
    folder, model = saved(tmp_path, (2,))
    before = {p.name: p.read_bytes() for p in (folder / "step_00000002").iterdir()}
    _fill_disk_at(monkeypatch, "state.pt")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1234, 1234))
    with pytest.raises(DiskFull) as e:
        checkpoint.save(folder, 4, model, {"step": 4}, {"recipe": {}})
    needed = sum(p.stat().st_size for p in (folder / "step_00000002").iterdir())  # the same sizes at step 4
    assert str(e.value) == (f"disk full writing checkpoint {folder / 'step_00000004'}: it needs {needed:,} bytes, "
                            f"1,234 bytes free; the partial folder .tmp-step_00000004 was removed and step_00000002 "
                            f"is intact. Free some space and rerun the same command to resume")
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002"]
    assert {p.name: p.read_bytes() for p in (folder / "step_00000002").iterdir()} == before
    assert checkpoint.latest(folder) == folder / "step_00000002"


def test_a_checkpoint_larger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch) -> None:
    folder, model = saved(tmp_path, (2,))
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    written: list[Path] = []
    monkeypatch.setattr(checkpoint, "_write", lambda path, data: written.append(path))
    with pytest.raises(DiskFull, match=r"^disk full writing checkpoint .*step_00000004: it needs [0-9,]+ bytes, 100 "
                                       r"bytes free; the partial folder \.tmp-step_00000004 was removed and "
                                       r"step_00000002 is intact"):
        checkpoint.save(folder, 4, model, {"step": 4}, {"recipe": {}})
    assert written == [] and sorted(p.name for p in folder.iterdir()) == ["step_00000002"]


def test_a_sharded_checkpoint_on_a_full_disk_is_the_same_error(tmp_path, monkeypatch) -> None:
    """DCP wraps the writer's OSError in its CheckpointException; it comes out as DiskFull too. The
    bytes needed are the process's tensors: 8 weights, AdamW's two moments of each and 2 step counts
    (fp32): 4 · (3 · 8 + 2) = 104."""
    import torch.distributed.checkpoint.filesystem as fs

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    checkpoint.save_sharded(tmp_path, 1, model, opt, {})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fs, "_write_item", full)
    with pytest.raises(DiskFull, match=rf"^disk full writing checkpoint {tmp_path}/step_00000002: it needs about "
                                       rf"104 bytes, [0-9,]+ bytes free; the partial folder \.tmp-step_00000002 was "
                                       rf"removed and step_00000001 is intact"):
        checkpoint.save_sharded(tmp_path, 2, model, opt, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step_00000001"
