"""Sharded checkpoints of a run of several processes, with ``torch.distributed.checkpoint`` (DCP).

:mod:`bigmodel.train.checkpoint` owns the folder scheme (``.tmp-step_*``, ``meta.json`` with every
file's size and sha256, the atomic rename) and dispatches here for the DCP part: every rank writes
its shards (``.metadata`` and ``__R_0.distcp`` files: the model under ``model.``, the optimizer's
tensors under ``optim.state.``) with :func:`write`; :func:`read_model` reads the model part on one
process (transfer, analysis); :func:`load_training` loads model and optimizer on any number of
processes (DCP reshards).

Only tensors are saved (the optimizer's hyper-parameters come from the recipe again), so nothing
but DCP's own metadata is ever unpickled. A checkpoint folder may come from someone else, so its
``.metadata`` is read as untrusted input before DCP reads anything else:

- it is unpickled by :class:`_MetadataUnpickler`, which admits DCP's metadata classes only;
- every storage entry (:func:`check`) must name a plain file of the folder that ``meta.json``
  lists, with its slice inside that file's recorded size, and no load-time transform;
- every entry is a tensor (a ``BytesStorageMetadata`` would reach DCP's
  ``torch.load(weights_only=False)``), whose chunks lie inside its size, and whose bytes —
  what a reader allocates — fit the slices that hold them, so a claimed size is bounded by the
  checkpoint's own files.
"""

from __future__ import annotations

import errno
import functools
import math
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from bigmodel.errors import CheckpointError

METADATA = ".metadata"


def write(tmp: Path, net: torch.nn.Module, opt: torch.optim.Optimizer, world: int) -> None:
    """Every rank: write this rank's shards of ``net`` (plain, DDP or FSDP2) and ``opt`` into ``tmp``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(net, opt)
    try:
        with warnings.catch_warnings():  # in one process (tests): not the warning that it assumes so
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.save({"model": model_state, "optim": {"state": _tensors_only(optim_state["state"])}},
                     storage_writer=dcp.FileSystemWriter(tmp, sync_files=True), no_dist=world == 1)
    except CheckpointException as e:  # every rank sees every rank's failure
        full = [x for x, _ in e.failures.values() if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT)]
        if full:  # as the OSError it is, for the caller's disk-full handling
            raise OSError(full[0].errno, f"{full[0].strerror} (writing {tmp})") from None
        raise


def read_model(ckpt: Path, files: dict[str, Any] | None, prefix: str = "") -> dict[str, torch.Tensor]:
    """The model's tensors under ``prefix`` (stripped), whole and on the CPU, in this one process.
    ``files`` is ``meta.json``'s record of the checkpoint's files (see :func:`check`)."""
    rd = reader(ckpt, files)
    entries = rd.read_metadata().state_dict_metadata
    want = f"model.{prefix}"
    weights = {k[len(want):]: torch.empty(m.size, dtype=m.properties.dtype)
               for k, m in entries.items() if k.startswith(want) and _is_tensor(m)}
    _dcp_load({"model": {prefix + k: v for k, v in weights.items()}}, rd, no_dist=True)
    return weights


def load_training(ckpt: Path, files: dict[str, Any] | None, net: torch.nn.Module, opt: torch.optim.Optimizer,
                  world: int) -> None:
    """Every rank: load model and optimizer state into ``net`` and ``opt`` (any process count)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(net, opt)  # the layout to load into (the optimizer's state created)
    wanted = {"model": model_state, "optim": {"state": optim_state["state"]}}
    rd = reader(ckpt, files)
    entries = rd.read_metadata().state_dict_metadata
    names = [f"model.{k}" for k in model_state]
    names += [f"optim.state.{p}.{k}" for p, s in optim_state["state"].items() for k in s]
    missing = [k for k in names if k not in entries]
    if missing or not all(_is_tensor(entries[k]) for k in names):
        raise CheckpointError(f"{ckpt} does not fit this model and optimizer (missing or not tensors: "
                              f"{', '.join(missing[:5]) or 'non-tensor entries'}); is it a checkpoint of this recipe?")
    _dcp_load(wanted, rd, no_dist=world == 1)
    set_state_dict(net, opt, model_state_dict=wanted["model"],
                   optim_state_dict={"state": wanted["optim"]["state"], "param_groups": optim_state["param_groups"]})


def _dcp_load(state: dict[str, Any], rd: Any, no_dist: bool) -> None:
    """``dcp.load`` in place into ``state``; in one process without the warning that it assumes so."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        if no_dist:
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, storage_reader=rd, no_dist=no_dist)


def _tensors_only(state: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's per-parameter state, refused if anything in it is not a tensor (DCP would
    pickle it, and loading would unpickle it)."""
    odd = [f"{p}.{k}" for p, s in state.items() for k, v in s.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise TypeError(f"optimizer state holds non-tensor values ({', '.join(odd[:3])}); "
                        f"a sharded checkpoint saves tensors only")
    return state


def _is_tensor(entry: Any) -> bool:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return isinstance(entry, TensorStorageMetadata)


# ---------------------------------------------------------------------------------------------
# Reading ``.metadata`` as untrusted input


# DCP writes its ``.metadata`` with pickle; these are the only globals such a file refers to.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                                              "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                              "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _file_sizes(ckpt: Path, files: dict[str, Any] | None) -> dict[str, int]:
    """The files a storage entry may name, with their sizes: those ``meta.json`` records (each a
    plain file of ``ckpt`` whose size on disk is the recorded one); without a record, the plain
    files of ``ckpt`` as they are."""
    folder = ckpt.resolve()
    if files is None:
        return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.is_symlink()}
    sizes = {}
    for name, rec in files.items():
        path = folder / str(name)
        if Path(str(name)).name != name or path.is_symlink() or not path.is_file() or path.resolve().parent != folder:
            raise CheckpointError(f"{ckpt}/meta.json lists {name!r}, which is not a file of the checkpoint folder; "
                                  f"refusing to load it")
        size = path.stat().st_size
        if not isinstance(rec, dict) or rec.get("bytes") != size:
            raise CheckpointError(f"{ckpt}/{name} has {size} bytes, meta.json records "
                                  f"{rec.get('bytes') if isinstance(rec, dict) else rec!r}; refusing to load it")
        sizes[name] = size
    return sizes


def check(metadata: Any, ckpt: Path, files: dict[str, Any] | None) -> None:
    """Refuse (:class:`CheckpointError`, one line naming the entry) a ``.metadata`` whose entries
    reach outside the checkpoint folder or claim more than its files hold (see the module
    docstring). ``files`` is ``meta.json``'s ``files`` record (``None`` for a checkpoint that has
    none: the folder's plain files are the bound then)."""
    from torch.distributed.checkpoint.metadata import MetadataIndex

    sizes = _file_sizes(Path(ckpt), files)

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{ckpt}/{METADATA}: {what}; refusing to load it (a bigmodel checkpoint names "
                               f"only its own files, within their recorded sizes)")

    storage = getattr(metadata, "storage_data", None)
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(storage, dict) or not isinstance(entries, dict):
        raise refuse("no storage table")
    for index, info in storage.items():
        rel, offset, length = (getattr(info, k, None) for k in ("relative_path", "offset", "length"))
        fqn = getattr(index, "fqn", index)
        if not isinstance(rel, str) or rel not in sizes or rel == METADATA:
            raise refuse(f"entry {fqn!r} names the file {rel!r}, which is not one of the checkpoint's files")
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset and 0 <= length
                and offset + length <= sizes[rel]):
            raise refuse(f"entry {fqn!r} reads bytes {offset}..{offset}+{length} of {rel}, "
                         f"which holds {sizes[rel]} bytes")
        if getattr(info, "transform_descriptors", None):
            raise refuse(f"entry {fqn!r} asks for load-time transforms {info.transform_descriptors!r}")
    for fqn, entry in entries.items():
        if not _is_tensor(entry):
            raise refuse(f"entry {fqn!r} is not a tensor ({type(entry).__name__}); "
                         f"a bigmodel checkpoint saves tensors only")
        size = tuple(entry.size)
        if not all(isinstance(n, int) and n >= 0 for n in size) or not isinstance(entry.properties.dtype, torch.dtype):
            raise refuse(f"entry {fqn!r} has an invalid size {size}")
        item = entry.properties.dtype.itemsize
        stored = 0
        for chunk in entry.chunks:
            offs, sz = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(offs) != len(size) or len(sz) != len(size) or any(
                    not (isinstance(o, int) and isinstance(s, int) and o >= 0 and s >= 0 and o + s <= n)
                    for o, s, n in zip(offs, sz, size, strict=True)):
                raise refuse(f"entry {fqn!r}: a chunk at {offs} of size {sz} lies outside its size {size}")
            info = storage.get(MetadataIndex(fqn, chunk.offsets))
            if info is None or info.length < math.prod(sz) * item:
                raise refuse(f"entry {fqn!r}: its chunk at {offs} ({math.prod(sz) * item} bytes) is not stored")
            stored += math.prod(sz)
        if math.prod(size) > stored:
            raise refuse(f"entry {fqn!r} claims a tensor of size {size} ({math.prod(size) * item} bytes), "
                         f"more than its stored chunks hold ({stored * item} bytes)")


@functools.cache
def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class Reader(FileSystemReader):
        """DCP's file reader, reading ``.metadata`` with :class:`_MetadataUnpickler` and refusing
        it (:func:`check`) before DCP reads anything else."""

        files: dict[str, Any] | None = None

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(Path(self.path) / METADATA, "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
                    raise CheckpointError(f"{self.path}/{METADATA}: {e}; refusing to load it") from None
            try:
                check(metadata, Path(self.path), self.files)
            except (AttributeError, TypeError, ValueError) as e:  # CheckpointError is a ValueError: kept as it is
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"{self.path}/{METADATA}: malformed ({type(e).__name__}: {e}); "
                                      f"refusing to load it") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return Reader


def reader(path: Path, files: dict[str, Any] | None) -> Any:
    """A DCP reader of checkpoint ``path`` whose files are ``files`` (``meta.json``'s record); its
    class is built on first use (DCP imports are slow)."""
    rd = _reader_class()(str(path))
    rd.files = files
    return rd
