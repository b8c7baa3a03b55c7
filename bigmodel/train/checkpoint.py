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

A run of several processes (DESIGN.md §7) saves a *sharded* checkpoint instead
(:func:`save_sharded`), in the same folder scheme and with the same atomic rename: every rank
writes its shards with ``torch.distributed.checkpoint`` (DCP: ``.metadata`` and ``__R_0.distcp``
files, the model under ``model.``, the optimizer's tensors under ``optim.state.``) and its RNG
state (``rng-RRRRR.pt``: CPU and CUDA), then rank 0 writes ``meta.json`` with every file's size
and sha256 (each rank hashes its own) and renames. DCP reshards on load, so such a checkpoint
resumes on any number of processes, one included (:func:`restore`); rank ``r`` takes the RNG
state rank ``r`` saved, and a rank that did not exist then gets a fresh stream seeded by
``(seed, step, rank)`` (the views of a step are seeded by ``(seed, step)`` alone, so only what a
forward pass draws from the global RNG — MAE's masks, dropout — depends on it). Only tensors are
saved (the optimizer's hyper-parameters come from the recipe again); the DCP part, and the checks
that read a ``.metadata`` as untrusted input, live in :mod:`bigmodel.train.dcp`. :func:`load_weights` reads
the model part of either kind on one process (transfer, analysis).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load_file

from bigmodel.errors import CheckpointError, DiskFull
from bigmodel.train import dcp, distributed

PREFIX = "step_"
FILES = ("model.safetensors", "state.pt")
DCP_METADATA = dcp.METADATA


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
    back past a damaged checkpoint, are replaced as the run reaches their step again).

    The files are serialised in memory first, so their size is known before anything is written.

    Raises:
        DiskFull: the disk has less room than the checkpoint needs, or filled up while it was
            written; the partial folder is removed and the previous checkpoints are untouched.
    """
    name = f"{PREFIX}{step:08d}"
    tmp = folder / f".tmp-{name}"
    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    blobs = {"model.safetensors": safetensors.torch.save(weights), "state.pt": buf.getvalue()}
    files = {f: {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()} for f, b in blobs.items()}
    blobs["meta.json"] = json.dumps({"step": step, **meta, "files": files}, indent=1, default=str).encode()
    needed = sum(map(len, blobs.values()))
    with _room(folder, tmp, needed):
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if shutil.disk_usage(folder).free < needed:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        tmp.mkdir()
        for f, data in blobs.items():
            _write(tmp / f, data)
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


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` to the new file ``path`` and fsync it."""
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def no_space(e: BaseException) -> bool:
    """Whether ``e`` (or what it was raised from) says the disk or the user's quota is full."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    return False


def _local_bytes(net: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """The bytes of this process's model and optimizer tensors (its shards under FSDP2)."""
    tensors = [*net.state_dict().values(), *(v for s in opt.state.values() for v in s.values())]
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors if isinstance(t, torch.Tensor))


@contextlib.contextmanager
def _room(folder: Path, tmp: Path, needed: int, rank: int = 0, exact: bool = True) -> Iterator[None]:
    """Turn a full disk while writing ``tmp`` into :class:`DiskFull` (one line: the folder, the
    bytes needed and free), after removing ``tmp`` (rank 0); any other error passes through."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not no_space(e):
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"{shutil.disk_usage(folder).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        before = [p.name for p in _complete(folder)] if folder.is_dir() else []
        kept = f"{before[-1]} is intact" if before else "no earlier checkpoint there"
        about, ckpt = "" if exact else "about ", folder / tmp.name[len(".tmp-"):]
        raise DiskFull(f"disk full writing checkpoint {ckpt}: it needs {about}{needed:,} bytes, "
                       f"{free}; the partial folder {tmp.name} was removed and {kept}. Free some space and rerun "
                       f"the same command to resume") from None


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
    names = sorted({DCP_METADATA, *(recorded or ())}) if is_sharded(ckpt) else FILES
    for name in names:
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
    weights = read_weights(ckpt, prefix)
    if drop:
        weights = {k: v for k, v in weights.items() if not k.startswith(drop)}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (drop and k.startswith(drop))]
    for what, keys in (("lacks weights the model needs", missing),
                       ("holds weights the model does not have", unexpected)):
        if keys:
            raise CheckpointError(f"{ckpt} {what}: {', '.join(keys[:5])}"
                                  f"{f' and {len(keys) - 5} more' if len(keys) > 5 else ''} ({len(keys)} in all"
                                  f"{f', prefix {prefix!r}' if prefix else ''}); "
                                  f"is it a checkpoint of this architecture?")


def read_weights(ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's tensors under ``prefix`` (stripped), whole and on the CPU, from either kind of
    checkpoint, in this one process."""
    ckpt = Path(ckpt)
    if is_sharded(ckpt):
        return dcp.read_model(ckpt, load_meta(ckpt).get("files"), prefix)
    weights = load_file(str(ckpt / "model.safetensors"))
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def load_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(Path(ckpt) / "state.pt", weights_only=True)


def is_sharded(ckpt: Path) -> bool:
    """Whether ``ckpt`` was saved by several processes (DCP) rather than one (safetensors)."""
    return (Path(ckpt) / DCP_METADATA).is_file()


# ---------------------------------------------------------------------------------------------
# Training state: saved by every rank of a run of several processes, restored on any number


def rng_state() -> dict[str, torch.Tensor]:
    """This process's global RNG state: CPU, and CUDA when there is a GPU."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_sharded(folder: Path, step: int, net: torch.nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any],
                 keep: int = 2) -> Path:
    """Every rank: write checkpoint ``step`` of a distributed run with DCP (see the module
    docstring and :mod:`bigmodel.train.dcp`), atomically, keeping the ``keep`` most recent;
    returns its folder."""
    rank, world = distributed.rank(), distributed.world()
    name = f"{PREFIX}{step:08d}"
    tmp, final = folder / f".tmp-{name}", folder / name
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".tmp-{PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    distributed.barrier()
    full = None
    try:
        with _room(folder, tmp, _local_bytes(net, opt), rank, exact=False):
            dcp.write(tmp, net, opt, world)
            torch.save(rng_state(), tmp / f"rng-{rank:05d}.pt")
            _fsync(tmp / f"rng-{rank:05d}.pt")
    except DiskFull as e:  # told to every rank below, so that none waits for the others
        full = str(e)
    mine = [*sorted(tmp.glob(f"__{rank}_*.distcp")), tmp / f"rng-{rank:05d}.pt"] if full is None else []
    parts = distributed.all_gather_objects({"files": {p.name: _digest(p) for p in mine}, "full": full})
    full = next((part["full"] for part in parts if part["full"]), None)
    if full is not None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise DiskFull(full)
    files = {k: v for part in parts for k, v in part["files"].items()}
    if rank == 0:
        files[DCP_METADATA] = _digest(tmp / DCP_METADATA)
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta, "format": "dcp", "world": world,
                                                   "files": dict(sorted(files.items()))}, indent=1, default=str))
        for f in (tmp / "meta.json", tmp / DCP_METADATA, tmp):
            _fsync(f)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(folder)
        for old in [p for p in _complete(folder) if p.name <= name][:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final

def restore(ckpt: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, seed: int = 0, rank: int = 0,
            world: int = 1) -> int:
    """Load a checkpoint of either kind into the training module ``net`` (plain, DDP or FSDP2)
    and its optimizer, on any number of processes (every rank of ``world`` calls it), and set this
    rank's RNG state (see the module docstring). Returns the checkpoint's step."""
    ckpt = Path(ckpt)
    step = int(load_meta(ckpt)["step"])
    if is_sharded(ckpt):
        dcp.load_training(ckpt, load_meta(ckpt).get("files"), net, opt, world)
        own = ckpt / f"rng-{rank:05d}.pt"
        rng = torch.load(own, weights_only=True) if own.is_file() else None
    else:
        state = load_state(ckpt)
        if distributed.sharded(net):  # FSDP2: the whole tensors of one process, sharded on load
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

            set_state_dict(net, opt, model_state_dict=read_weights(ckpt),
                           options=StateDictOptions(full_state_dict=True),
                           optim_state_dict=_by_name(state["optimizer"], net, opt))
        else:
            load_weights(ckpt, distributed.unwrapped(net))
            opt.load_state_dict(state["optimizer"])
        cuda = {"cuda": state["cuda_rng"]} if "cuda_rng" in state else {}
        rng = {"cpu": state["rng"], **cuda} if rank == 0 else None
    if rng is None:
        distributed.seed_rank(seed, rank, step)
    else:
        set_rng_state(rng)
    return step


def _by_name(optim_state: dict[str, Any], net: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """A one-process optimizer state dict (parameters numbered in the optimizer's order) keyed by
    parameter names instead, as ``set_state_dict`` takes it."""
    names = {id(p): n for n, p in net.named_parameters()}
    order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    return {"state": {order[int(i)]: s for i, s in optim_state["state"].items()},
            "param_groups": [{**g, "params": [order[int(i)] for i in g["params"]]}
                             for g in optim_state["param_groups"]]}


def load_meta(ckpt: Path) -> dict[str, Any]:
    return json.loads((Path(ckpt) / "meta.json").read_text())
