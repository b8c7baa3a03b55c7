"""A folder of image files, decoded once into memory (DESIGN.md §2, §8).

Layouts:

- ``root/<class>/**/<file>`` — class sub-folders, labelled by the sorted folder names (as
  torchvision's ``ImageFolder``); files lying directly in ``root`` are ignored;
- ``root/<file>`` — a flat folder, unlabelled (label ``-1``);
- ``root/train/…`` and ``root/test/…`` — either layout inside each (the same in both): ``split``
  picks the folder. The class list is the train folder's, for both splits, so a class with no test
  images shifts no label; a test class the train folder lacks is an error.

Without ``train/`` and ``test/`` folders ``split`` is a fixed, seeded holdout: ``test_fraction`` of
each class (of the whole folder when flat) is ``test``, the rest ``train``; the same files land
on the same side on every run and machine.

Candidates are the files with an image extension that PIL opens (``.png``, ``.jpg``, ``.webp``, …).
Other files (``notes.txt``, ``Thumbs.db``, hidden files such as ``.DS_Store``) are ignored: counted
and listed in the dataset's ``ignored`` attribute and logged once, never counted as bad images.
Candidates that cannot be decoded (truncated images, a text file named ``.jpg``) are skipped,
counted and listed: logged as warnings and kept as ``(path, reason)`` pairs in the dataset's
``skipped`` attribute for the run report. When more than ``max_bad_fraction`` of the candidates
are bad the build stops with a message naming the count, the fraction and the knob.
"""

from __future__ import annotations

import logging
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from PIL import Image
from pydantic import Field

from bigmodel.data.base import MissingData, TensorImages, expand_path
from bigmodel.errors import DataError
from bigmodel.registry import DATASETS

log = logging.getLogger(__name__)

Image.init()
IMAGE_EXTS = frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


class FolderImages(TensorImages):
    """:class:`TensorImages` that remembers which files were skipped and why."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str] | None,
                 skipped: list[tuple[str, str]], candidates: int, ignored: list[str] | None = None):
        super().__init__(images, targets, classes, len(classes) if classes else None)
        self.skipped = skipped
        self.candidates = candidates
        self.ignored = ignored or []


def _files(folder: Path, ignored: list[str]) -> list[Path]:
    """Image files (by extension) under ``folder``, in a stable (sorted) order; every other file
    is appended to ``ignored``. Hidden folders are not entered. Links to folders are followed, each
    real folder once (by device and inode): a link back to a parent, or two links to one folder,
    add no file twice and cannot loop."""
    out = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: already listed
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            path = Path(dirpath) / f
            if not f.startswith(".") and path.suffix.lower() in IMAGE_EXTS:
                out.append(path)
            else:
                ignored.append(str(path))
    return out


def _decode(path: Path, mode: str, size: int | None) -> np.ndarray:
    """One file → uint8 ``(H, W)`` or ``(H, W, 3)``; raises on anything unreadable.

    With ``size`` the shorter side is resized to ``size`` (bicubic, antialiased) and the centre
    ``size × size`` square is cut out, keeping the aspect ratio.
    """
    with Image.open(path) as im:
        im.load()  # decodes the whole file: truncated data raises here
        im = im.convert(mode)
    return np.asarray(centre_square(im, size) if size is not None else im)


def centre_square(im: Image.Image, size: int | None = None) -> Image.Image:
    """The centre square of a PIL image, after resizing its shorter side to ``size`` (bicubic,
    antialiased; the aspect ratio kept); without ``size``, the square of the shorter side as it is."""
    w, h = im.size
    size = size or min(w, h)
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _try_decode(path: Path, mode: str, size: int | None) -> np.ndarray | str:
    try:
        return _decode(path, mode, size)
    except Exception as e:  # PIL raises many kinds (UnidentifiedImageError, OSError, ValueError, ...)
        return f"{type(e).__name__}: {e}".replace(str(path), "<file>")


def _holdout(n: int, fraction: float, seed: int, key: str) -> torch.Tensor:
    """Boolean mask of the ``test`` part of ``n`` files: a seeded choice of round(n·fraction)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=g)[: round(n * fraction)]] = True
    return mask


def _subdirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _split_classes(root: Path) -> list[str]:
    """The class list of a ``train/`` + ``test/`` layout: the train folder's, checked against test's."""
    train, test = _subdirs(root / "train"), _subdirs(root / "test")
    if bool(train) != bool(test):
        raise DataError(f"imagefolder {str(root)!r}: train/ {'has' if train else 'has no'} class sub-folders but "
                        f"test/ {'has' if test else 'has none'}; give both the same layout")
    extra = sorted(set(test) - set(train))
    if extra:
        raise DataError(f"imagefolder {str(root)!r}: test/ has classes that train/ lacks: {', '.join(extra[:5])}"
                        f"{' …' if len(extra) > 5 else ''} ({len(extra)}); every test class needs a train/ folder "
                        f"(the class list is train/'s: {', '.join(train[:5])}{' …' if len(train) > 5 else ''})")
    return train


def _listing(folder: Path, split: str, test_fraction: float, seed: int,
             ignored: list[str]) -> tuple[list[Path], list[int], list[str] | None]:
    """The files of ``split`` with their labels and the class names (``None`` when flat)."""
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        classes = _split_classes(folder)
        folder, fraction = folder / split, None
        present = set(_subdirs(folder))
    else:
        classes, fraction = _subdirs(folder), test_fraction
        present = set(classes)
    groups = [(c, _files(folder / c, ignored) if c in present else []) for c in classes] if classes \
        else [("", _files(folder, ignored))]
    if classes:  # files lying directly in a labelled root belong to no class
        ignored += [str(p) for p in sorted(folder.iterdir()) if p.is_file()]
    files, labels = [], []
    for label, (name, group) in enumerate(groups):
        if fraction is not None and group:
            test = _holdout(len(group), fraction, seed, name)
            group = [f for f, t in zip(group, test.tolist(), strict=True) if t == (split == "test")]
        files += group
        labels += [label if classes else -1] * len(group)
    return files, labels, classes or None


@DATASETS.register("imagefolder")
def imagefolder(
    root: str,
    split: Literal["train", "test"] = "train",
    image_size: Annotated[int, Field(ge=4, le=4096)] | None = None,
    channels: Literal[1, 3] = 3,
    max_bad_fraction: Annotated[float, Field(ge=0, le=1)] = 0.01,
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.2,
    seed: int = 0,
    workers: Annotated[int, Field(ge=1)] | None = None,
) -> FolderImages:
    """Decode every image of ``root`` (see the module docstring for the layouts) into memory.

    Args:
        root: the folder.
        image_size: resize (shorter side) and centre-crop every image to this square; without it
            all images must already be squares of one size.
        channels: 1 (grey) or 3 (RGB); every file is converted.
        max_bad_fraction: stop when more than this fraction of the files cannot be read.
        test_fraction: share of each class held out as ``test`` when ``root`` has no
            ``train/``/``test/`` folders.
        seed: seed of that holdout.
        workers: decoding threads (default: the CPU count, at most 8).
    """
    folder = expand_path(root)
    if not folder.is_dir():
        raise MissingData(f"data.root={root!r}: no such folder (expected class sub-folders of images, "
                          f"or a flat folder of images)")
    ignored: list[str] = []
    files, labels, classes = _listing(folder, split, test_fraction, seed, ignored)
    if ignored:
        log.info("imagefolder: ignored %d files that are not images by extension (%s%s)", len(ignored),
                 ", ".join(Path(p).name for p in ignored[:5]), ", …" if len(ignored) > 5 else "")
    if not files:
        raise DataError(f"data.root={root!r}: no image files found for split {split!r}"
                        + (f" (ignored {len(ignored)} files without an image extension, e.g. {Path(ignored[0]).name})"
                            if ignored else ""))
    mode = "L" if channels == 1 else "RGB"
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:  # PIL decodes outside the GIL
        decoded = list(pool.map(lambda f: _try_decode(f, mode, image_size), files))

    skipped = [(str(f), d) for f, d in zip(files, decoded, strict=True) if isinstance(d, str)]
    for path, reason in skipped:
        log.warning("imagefolder: skipped %s (%s)", path, reason)
    if len(skipped) > max_bad_fraction * len(files):
        first = "; ".join(f"{p}: {r}" for p, r in skipped[:3])
        raise DataError(
            f"imagefolder {root!r}: {len(skipped)} of {len(files)} files ({100 * len(skipped) / len(files):.1f}%) "
            f"could not be read, more than data.max_bad_fraction={max_bad_fraction} allows; fix or remove them, "
            f"or raise data.max_bad_fraction. First: {first}")

    good = [(d, y, f) for d, y, f in zip(decoded, labels, files, strict=True) if not isinstance(d, str)]
    if not good:
        raise DataError(f"imagefolder {root!r}: none of the {len(files)} files could be read")
    shapes = {d.shape[:2] for d, _, _ in good}
    if len(shapes) > 1 or next(iter(shapes))[0] != next(iter(shapes))[1]:
        examples = {d.shape[:2]: f for d, _, f in good}
        shown = ", ".join(f"{f.name} {h}x{w}" for (h, w), f in list(examples.items())[:3])
        raise DataError(f"imagefolder {root!r}: images are not squares of one size ({shown}); "
                        f"set data.image_size to resize and centre-crop them")
    x = np.stack([d for d, _, _ in good])
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    y = torch.tensor([lab for _, lab, _ in good], dtype=torch.long)
    return FolderImages(torch.from_numpy(np.ascontiguousarray(x)), y, classes, skipped, len(files), ignored)
