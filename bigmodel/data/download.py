"""``bigmodel data get NAME``: fetch a classic data set with torchvision and convert it, once, to
``NAME.npz`` in the user's data folder, where zoo recipes find it as ``$BIGMODEL_DATA/NAME.npz``.

Names: ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``, ``svhn``, ``stl10``.

1. The raw files are torchvision's own: its URLs (and mirrors) and its md5 checksums, taken from
   the dataset classes when the command runs, fetched by torchvision's downloader (a progress bar
   per file) into ``FOLDER/raw``, the layout torchvision's dataset classes read (and the default
   root of the ``mnist`` … ``stl10`` datasets of :mod:`bigmodel.data.torchvision_sets`). A file
   already there with the right checksum is not fetched again, so a file placed by hand is used.
2. torchvision's dataset class reads the raw files; the arrays are written to ``FOLDER/NAME.npz``
   in the layout the ``npz`` dataset reads (``x_train, y_train, x_test, y_test, classes``: uint8
   images, channels last; int64 labels; the class names), through a temporary file and a rename,
   and the sha256 and size of what was written are printed.

``FOLDER`` is ``$BIGMODEL_DATA`` (:func:`bigmodel.data.base.user_data`) or ``--root DIR``. A file
that cannot be fetched (no network) or fails its checksum stops the command with one line naming
the URL and where to put the file by hand; what that download left is removed, so nothing is
half-written (files fetched whole before it stay: they passed their checksums).
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from torchvision import datasets as tvd
from torchvision.datasets.utils import download_url, extract_archive

from bigmodel.data.base import data_file, find_data, missing_file_hint, user_data
from bigmodel.errors import DataError

DIGITS = [str(i) for i in range(10)]


@dataclasses.dataclass(frozen=True)
class Resource:
    """One file torchvision downloads.

    Attributes:
        urls: where to fetch it, torchvision's first, then its mirrors.
        filename: its name on disk.
        md5: torchvision's checksum of it.
        folder: the folder it goes in, relative to the raw folder.
        extract: unpack it there (a ``.gz`` file or a ``.tar.gz`` archive) after the check.
    """

    urls: tuple[str, ...]
    filename: str
    md5: str
    folder: str = ""
    extract: bool = True


Arrays = tuple[np.ndarray, np.ndarray, list[str]]  # images (N, H, W[, C]) uint8, labels (N,) int64, class names


@dataclasses.dataclass(frozen=True)
class Source:
    """A data set ``bigmodel data get`` knows: its raw files and how to read one split of them."""

    resources: Callable[[], list[Resource]]
    read: Callable[[Path, str], Arrays]  # (raw folder, "train" | "test") → arrays; RuntimeError when files are missing


def _mnist_resources(cls: type[tvd.MNIST]) -> Callable[[], list[Resource]]:
    return lambda: [Resource(tuple(m + name for m in cls.mirrors), name, md5, f"{cls.__name__}/raw")
                    for name, md5 in cls.resources]


def _mnist_read(cls: type[tvd.MNIST], classes: list[str] | None) -> Callable[[Path, str], Arrays]:
    def read(raw: Path, split: str) -> Arrays:
        ds = cls(str(raw), train=split == "train")
        return ds.data.numpy(), ds.targets.numpy().astype(np.int64), classes or list(ds.classes)
    return read


def _archive(cls: type) -> Callable[[], list[Resource]]:
    """CIFAR-10/100 and STL-10: one tarball extracted into the raw folder."""
    return lambda: [Resource((cls.url,), cls.filename, cls.tgz_md5)]


def _cifar_read(cls: type[tvd.CIFAR10]) -> Callable[[Path, str], Arrays]:
    def read(raw: Path, split: str) -> Arrays:
        ds = cls(str(raw), train=split == "train")
        return ds.data, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)
    return read


def _svhn_resources() -> list[Resource]:
    return [Resource((url,), name, md5, extract=False)
            for url, name, md5 in (tvd.SVHN.split_list[s] for s in ("train", "test"))]


def _svhn_read(raw: Path, split: str) -> Arrays:
    ds = tvd.SVHN(str(raw), split=split)  # labels 0..9 (torchvision maps the file's 10 to 0)
    return ds.data.transpose(0, 2, 3, 1), ds.labels.astype(np.int64), DIGITS


def _stl10_read(raw: Path, split: str) -> Arrays:
    ds = tvd.STL10(str(raw), split=split)  # the labelled splits: 5,000 train, 8,000 test
    return ds.data.transpose(0, 2, 3, 1), ds.labels.astype(np.int64), list(ds.classes)


# MNIST keeps the digits as class names ('0'..'9', as the shared mnist.npz), not torchvision's '0 - zero'.
SOURCES: dict[str, Source] = {
    "mnist": Source(_mnist_resources(tvd.MNIST), _mnist_read(tvd.MNIST, DIGITS)),
    "fashion_mnist": Source(_mnist_resources(tvd.FashionMNIST), _mnist_read(tvd.FashionMNIST, None)),
    "cifar10": Source(_archive(tvd.CIFAR10), _cifar_read(tvd.CIFAR10)),
    "cifar100": Source(_archive(tvd.CIFAR100), _cifar_read(tvd.CIFAR100)),
    "svhn": Source(_svhn_resources, _svhn_read),
    "stl10": Source(_archive(tvd.STL10), _stl10_read),
}


def get_command(name: str, root: str | Path | None = None) -> str:
    """The command that writes ``name``.npz (``--root`` only when given)."""
    return f"bigmodel data get {name}" + (f" --root {root}" if root is not None else "")


def missing_hint(path: str) -> str:
    """Why the data file ``path`` is missing and how to get it: for ``$BIGMODEL_DATA/NAME.npz`` with
    a NAME this module knows, ``"NAME.npz is in no data folder (...); get it with: bigmodel data get NAME"``;
    for other paths ``"no such file; looked for ..."``."""
    hint = missing_file_hint(path)
    name = data_file(path)
    if name is None:
        return f"no such file; {hint}"
    stem = name.removesuffix(".npz")
    if name.endswith(".npz") and stem in SOURCES:
        return f"{hint}; get it with: {get_command(stem)}"
    return f"{hint}; put it in {user_data()}, or set BIGMODEL_DATA to the folder that has it"


def get(name: str, root: str | Path | None = None, console: Console | None = None) -> dict:
    """Write ``FOLDER/NAME.npz`` (see the module docstring) unless a data folder already has it.

    Args:
        name: one of :data:`SOURCES`.
        root: the data folder to fill (default ``$BIGMODEL_DATA``); the raw files go in ``root/raw``.

    Returns:
        ``{"path", "written"}``, plus ``"sha256"``, ``"size"`` (bytes) and ``"images"`` (train, test)
        when the file was written.

    Raises:
        DataError: an unknown name, a file that could not be fetched or failed its checksum.
    """
    console = console or Console(stderr=True)

    def say(line: str) -> None:  # one line as written: no markup, no highlighting, no wrapping
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    if name not in SOURCES:
        raise DataError(f"data get {name!r}: no such data set; choose one of {', '.join(SOURCES)}")
    file = f"{name}.npz"
    folder = Path(root).expanduser() if root is not None else user_data()
    present = (folder / file if (folder / file).exists() else None) if root is not None else find_data(file)
    if present is not None:
        say(f"{file} is already in {present.parent}; nothing to do (delete it to get it again)")
        return {"path": present, "written": False}
    source, raw = SOURCES[name], folder / "raw"
    try:
        splits = [source.read(raw, s) for s in ("train", "test")]
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        say(f"fetching {name} with torchvision into {raw}")
        for res in source.resources():
            _fetch(res, raw, name, root)
        splits = [source.read(raw, s) for s in ("train", "test")]
    (x_train, y_train, classes), (x_test, y_test, _) = splits
    say(f"converting to {folder / file}: {len(x_train)} train and {len(x_test)} test images "
                  f"{tuple(x_train.shape[1:])}, {len(classes)} classes")
    _write_npz(folder / file, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
               classes=np.asarray(classes, dtype=str))
    sha, size = _sha256(folder / file), (folder / file).stat().st_size
    say(f"wrote {folder / file}  {size:,} bytes  sha256 {sha}")
    if root is not None and find_data(file) != folder / file:
        say(f"recipes read $BIGMODEL_DATA/{file}: set BIGMODEL_DATA={folder} to use this copy")
    return {"path": folder / file, "written": True, "sha256": sha, "size": size, "images": (len(x_train), len(x_test))}


def _fetch(res: Resource, raw: Path, name: str, root: str | Path | None) -> None:
    """Download ``res`` into ``raw/res.folder`` (each URL in turn) and unpack it; on any failure
    remove every path this call created there and raise :class:`DataError`."""
    folder = raw / res.folder
    made = [p for p in (raw.parent, raw) if not p.exists()]
    before = _paths(raw)
    by_hand = (f"download {res.filename} from {res.urls[0]} on a machine with a network, put it in {folder}/ "
               f"and rerun: {get_command(name, root)}")
    try:
        errors = []
        for url in res.urls:
            try:
                download_url(url, str(folder), res.filename, res.md5)
                break
            except (OSError, http.client.HTTPException) as e:  # URLError is an OSError: unreachable, refused, 404
                errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
            except RuntimeError as e:  # torchvision: "File not found or corrupted." (md5 mismatch)
                raise DataError(f"data get {name}: {url} was fetched but is not the file torchvision expects "
                                f"(md5 should be {res.md5}); refused and removed. Retry, or {by_hand}") from e
        else:
            tried = errors[0] + (f" (also tried {'; '.join(errors[1:])})" if errors[1:] else "")
            raise DataError(f"data get {name}: could not fetch {tried}. Without a network, {by_hand}")
        if res.extract:
            extract_archive(str(folder / res.filename), str(folder))
    except BaseException:
        _remove_new(raw, before, made)
        raise


def _paths(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.exists() else set()


def _remove_new(raw: Path, before: set[Path], made: list[Path]) -> None:
    """Remove what appeared under ``raw`` since ``before`` was taken (deepest first), then the
    folders in ``made`` (created on the way) if they are empty."""
    for p in sorted(_paths(raw) - before, key=lambda p: len(p.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            if not any(p.iterdir()):
                p.rmdir()
        else:
            p.unlink(missing_ok=True)
    for p in reversed(made):
        if p.is_dir() and not any(p.iterdir()):
            p.rmdir()


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed`` to a temporary file beside ``path``, fsync, rename: a reader sees the
    whole archive or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()  # read in blocks (hashlib.file_digest needs Python 3.11; we support 3.10)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
