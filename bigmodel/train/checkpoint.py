"""Atomic, verified, resumable checkpoints (DESIGN.md §8).

A checkpoint is a folder ``checkpoints/step_XXXXXXXX`` holding

- ``model.safetensors`` — the objective's state dict (backbone under ``backbone.``, heads beside);
- ``state.pt`` — optimizer state, RNG state and step: tensors and plain containers only, loaded
  with ``torch.load(weights_only=True)`` so no arbitrary object is ever unpickled;
- ``meta.json`` — step, the resolved recipe, a few summary numbers and ``files``: the size and
  sha256 of the two files above, checked by :func:`latest` before a checkpoint is used.

It is written into ``.tmp-step_XXXXXXXX``, every file fsynced, then renamed into place and the
parent fsynced: a kill at any instant leaves either the previous complete checkpoint or a
``.tmp-*`` folder that :func:`latest` never looks at (and the next save clears away). A file
damaged after the fact (a full disk, a bad copy) fails its checksum: :func:`latest` names it and
falls back to the newest intact checkpoint; it deletes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bigmodel.recipe import RecipeError

PREFIX = "step_"
FILES = ("model.safetensors", "state.pt")


class CheckpointError(RecipeError):
    """No usable checkpoint, or weights that do not fit the model: one line for the user."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def save(folder: Path, step: int, model: torch.nn.Module, state: dict[str, Any], meta: dict[str, Any],
         keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically, with its files' sizes and sha256 in ``meta.json``;
    keep the ``keep`` most recent checkpoints up to this one (newer ones, left by a run that fell
    back past a damaged checkpoint, are replaced as the run reaches their step again)."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f".tmp-{PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{name}"
    tmp.mkdir()
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    files = {f: _digest(tmp / f) for f in FILES}
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta, "files": files}, indent=1, default=str))
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    final = folder / name
    if final.exists():  # same step saved again (e.g. a final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(folder)
    complete = [p for p in _complete(folder) if p.name <= name]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(folder: Path) -> list[Path]:
    """Checkpoint folders whose rename completed (they hold ``meta.json``), oldest first."""
    return [p for p in sorted(folder.glob(f"{PREFIX}*")) if (p / "meta.json").is_file()]


def problem(ckpt: Path) -> str | None:
    """Why checkpoint ``ckpt`` cannot be used (a missing, truncated or altered file), or ``None``.
    Checkpoints saved before checksums were recorded are checked for their files only."""
    ckpt = Path(ckpt)
    try:
        recorded = load_meta(ckpt).get("files")
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable ({type(e).__name__})"
    for name in FILES:
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        if not recorded or name not in recorded:
            continue
        want, size = recorded[name], path.stat().st_size
        if size != want["bytes"]:
            return f"{name} has {size} bytes, {want['bytes']} were written"
        if _digest(path)["sha256"] != want["sha256"]:
            return f"{name} fails its sha256 check"
    return None


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def latest(folder: Path, warn: Callable[[str], None] = _warn) -> Path | None:
    """The most recent intact checkpoint in ``folder`` (a run dir, its ``checkpoints/``, or one
    checkpoint folder); ``None`` when there is none at all.

    A damaged checkpoint is named through ``warn`` and skipped for the next older one.

    Raises:
        CheckpointError: checkpoints exist but none is intact (nothing is deleted).
    """
    folder = Path(folder)
    if (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    candidates = [folder] if (folder / "meta.json").is_file() else _complete(folder)[::-1]
    bad = []
    for ckpt in candidates:
        why = problem(ckpt)
        if why is None:
            for b in bad:
                warn(f"{b}; using {ckpt.name} instead")
            return ckpt
        bad.append(f"checkpoint {ckpt}: {why}")
    if bad:
        more = f" (and {len(bad) - 1} older, all damaged)" if len(bad) > 1 else ""
        raise CheckpointError(f"{bad[0]}{more}; no intact checkpoint to load. Nothing was deleted: "
                              f"restore the file, or move {folder} aside to start afresh")
    return None


def load_weights(ckpt: Path, model: torch.nn.Module, prefix: str = "", drop: tuple[str, ...] = ()) -> None:
    """Load ``model.safetensors`` into ``model``; every weight of ``model`` must be in it.

    Args:
        prefix: only keys under this prefix, with it stripped (``"backbone."`` loads a backbone
            out of an objective's checkpoint).
        drop: key prefixes (after ``prefix`` is stripped) to leave out on both sides, e.g. a head
            replaced for a new task: those may be missing or extra; any other key may not.

    Raises:
        CheckpointError: keys other than ``drop``'s are missing from the checkpoint or unknown to
            the model (the first few are named, with their count).
    """
    drop = tuple(drop)
    weights = load_file(str(Path(ckpt) / "model.safetensors"))
    weights = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    if drop:
        weights = {k: v for k, v in weights.items() if not k.startswith(drop)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (drop and k.startswith(drop))]
    for what, keys in (("lacks weights the model needs", missing), ("holds weights the model does not have", unexpected)):
        if keys:
            raise CheckpointError(f"{ckpt} {what}: {', '.join(keys[:5])}"
                                  f"{f' and {len(keys) - 5} more' if len(keys) > 5 else ''} ({len(keys)} in all"
                                  f"{f', prefix {prefix!r}' if prefix else ''}); is it a checkpoint of this architecture?")


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / "state.pt", weights_only=True)


def load_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "meta.json").read_text())
