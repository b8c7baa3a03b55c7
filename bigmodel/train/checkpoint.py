"""Atomic, resumable checkpoints (DESIGN.md §8).

A checkpoint is a folder ``checkpoints/step_XXXXXXXX`` holding

- ``model.safetensors`` — the objective's state dict (backbone under ``backbone.``, heads beside);
- ``state.pt`` — optimizer state, RNG state and step: tensors and plain containers only, loaded
  with ``torch.load(weights_only=True)`` so no arbitrary object is ever unpickled;
- ``meta.json`` — step, the resolved recipe and a few summary numbers.

It is written into ``.tmp-step_XXXXXXXX``, every file fsynced, then renamed into place and the
parent fsynced: a kill at any instant leaves either the previous complete checkpoint or a
``.tmp-*`` folder that :func:`latest` never looks at (and the next save clears away).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step_"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: Path, step: int, model: torch.nn.Module, state: dict[str, Any], meta: dict[str, Any],
         keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; keep the ``keep`` most recent ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{name}"
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1, default=str))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    final = folder / name
    if final.exists():  # same step saved again (e.g. a final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(folder)
    complete = [p for p in sorted(folder.glob(f"{PREFIX}*")) if (p / "meta.json").is_file()]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(folder: Path) -> Path | None:
    """The most recent complete checkpoint in ``folder`` (a run dir or its ``checkpoints/``)."""
    folder = Path(folder)
    if (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    if (folder / "meta.json").is_file():
        return folder
    done = [p for p in sorted(folder.glob(f"{PREFIX}*")) if (p / "meta.json").is_file()]
    return done[-1] if done else None


def load_weights(ckpt: Path, model: torch.nn.Module, prefix: str = "", drop: tuple[str, ...] = ()) -> None:
    """Load ``model.safetensors`` into ``model``.

    Args:
        prefix: only keys under this prefix, with it stripped (``"backbone."`` loads a backbone
            out of an objective's checkpoint).
        drop: key prefixes to leave out (e.g. a head replaced for a new task).
    """
    weights = load_file(str(Path(ckpt) / "model.safetensors"))
    weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    weights = {k: v for k, v in weights.items() if not k.startswith(drop)} if drop else weights
    missing, unexpected = model.load_state_dict(weights, strict=not drop)
    if unexpected:
        raise ValueError(f"{ckpt}: unexpected weights {unexpected[:5]}")


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / "state.pt", weights_only=True)


def load_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "meta.json").read_text())
