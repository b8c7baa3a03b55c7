"""WebDataset tar shards: streamed, split across ranks and workers, resumable (DESIGN.md §2, §7).

A shard is a tar of samples ``{key}.png`` (or ``.jpg``/``.webp``/``.npy``) plus ``{key}.cls``
(the label as text; absent when unlabelled). ``bigmodel data shard`` writes them together with an
index ``{split}.json`` (sample count per shard, image size, channels, classes), so that a reader
knows the corpus without opening it.

Order of the stream. Epoch ``e`` visits the shards in a permutation seeded by ``(seed, e)``; its
``N`` samples, in that order, are cut into ``streams`` contiguous ranges, one per stream. A stream
therefore reads its own shards (it shares at most one boundary shard with each neighbour, whatever
the shard sizes) and every sample is in exactly one stream per epoch. Within its range a stream
shuffles blocks of ``shuffle`` samples with a permutation seeded by ``(seed, e, stream, block)``.

Position. As for map-style data (:mod:`bigmodel.data.loader`) the data position is the step,
saved in every checkpoint: the global batch of step ``t`` is the next ``batch_size`` samples of
stream ``t mod streams``, whose position is ``(t div streams) · batch_size``. Any step is reached
by skipping undecoded samples, so a resumed run reads exactly the samples the uninterrupted run
would have read, neither repeating nor skipping any, with nothing to save but the step.

Several processes. The stream, and so the global batch of every step, depends on ``seed``,
``batch_size`` and ``streams`` (fixed by the recipe), not on the number of processes or of
DataLoader workers: a run saved on 2 processes resumes on 1 or 4 where it stopped. Rank ``r``
decodes only its rows of each batch (:func:`bigmodel.data.loader.rank_rows`) and skips the others'
undecoded: every rank reads the bytes of the whole global batch, and decodes ``1/world`` of it.
Each DataLoader worker serves whole streams, so ``streams`` should be a multiple of the workers.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from pydantic import Field
from torch.utils.data import IterableDataset

from bigmodel.data.base import ImageDataset, MissingData, TensorImages, expand_path
from bigmodel.data.loader import rank_rows
from bigmodel.data.shard_check import check_counts
from bigmodel.errors import DataError
from bigmodel.registry import DATASETS

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "ppm", "bmp", "npy")
INDEX_FORMAT = "bigmodel-shards/1"


# ---------------------------------------------------------------------------------------------
# Reading


def raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """Undecoded samples ``{"__key__", "png": bytes, "cls": bytes, ...}`` of one shard, in order."""
    return wds.tarfile_samples([{"url": url}])


def decode(sample: dict[str, Any], channels: int | None) -> tuple[torch.Tensor, int]:
    """One raw sample → ``(uint8 (channels, H, W), label or -1)``; ``channels=None`` keeps the
    file's own (grey: 1, colour: 3; alpha dropped)."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise DataError(f"sample {sample.get('__key__')!r} of {sample.get('__url__')}: no image "
                        f"(looked for .{', .'.join(IMAGE_EXTS)}; "
                        f"found {sorted(k for k in sample if not k.startswith('__'))})")
    if ext == "npy":  # uint8 (H, W) or (C, H, W)
        arr = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
        img = torch.from_numpy(arr if arr.ndim == 3 else arr[None])
        if channels is not None and img.shape[0] != channels:
            img = (img.expand(channels, -1, -1) if img.shape[0] == 1
                   else img.float().mean(0, keepdim=True).round().to(torch.uint8))
    else:
        with Image.open(io.BytesIO(sample[ext])) as im:
            if channels is None:
                channels = 1 if im.mode in ("1", "L", "LA", "I", "I;16", "F") else 3
            arr = np.array(im.convert("L" if channels == 1 else "RGB"))
        img = torch.from_numpy(arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1)))
    label = int(sample["cls"].decode()) if "cls" in sample else -1
    return img, label


class _Slot:
    """The endless sample stream of one stream (a *slot* of the epoch's sequence), opened at a
    position (see the module docstring)."""

    def __init__(self, ds: Shards, slot: int, slots: int, seed: int, pos: int):
        self.ds, self.slot, self.seed, self.pos = ds, slot, seed, pos
        n = len(ds)
        self.a, self.b = slot * n // slots, (slot + 1) * n // slots
        if self.b == self.a:
            raise ValueError(f"shards: {n} samples cannot feed data.streams = {slots} streams; lower data.streams")
        self._it = self._samples()

    def take(self, k: int) -> list[dict[str, Any]]:
        out = list(islice(self._it, k))
        self.pos += len(out)
        return out

    def _samples(self) -> Iterator[dict[str, Any]]:
        length, q = self.b - self.a, self.ds.shuffle
        epoch, offset = divmod(self.pos, length)
        while True:
            if not q:
                yield from self.ds._range(epoch, self.a + offset, self.b, self.seed)
            else:
                first = offset // q  # the block holding ``offset``; earlier blocks are not read
                raw = self.ds._range(epoch, self.a + first * q, self.b, self.seed)
                for k in range(first, -(-length // q)):
                    block = list(islice(raw, min(q, length - k * q)))
                    rng = np.random.default_rng([self.seed % 2**32, epoch, self.slot, k])
                    skip = offset - k * q if k == first else 0
                    yield from (block[i] for i in rng.permutation(len(block))[skip:])
            epoch, offset = epoch + 1, 0


@DATASETS.register("shards")
class Shards(IterableDataset, ImageDataset):
    """WebDataset tar shards, streamed (see the module docstring for order and resumption).

    Args:
        urls: a folder written by ``bigmodel data shard`` (it holds ``{split}.json``), or shard
            URLs with braces, e.g. ``data/train-{000000..000009}.tar``; ``{split}`` in them is
            replaced by the split, ``$BIGMODEL_SHARED_DATA`` in a local path by the shared data
            folder. Anything webdataset opens works (paths, http(s), ``pipe:``), when written
            here: an index only ever names files inside its own folder.
        index: the ``{split}.json`` index for explicit ``urls`` (default: the one beside the first
            shard if it is there; else the shards are counted once by reading them).
        streams: independent read streams (of the whole run, whatever the number of processes);
            DataLoader workers each serve whole streams, so make it a multiple of
            ``run.num_workers``. Part of the data order: keep it on resume.
        shuffle: block size of the in-stream shuffle (0: shard order only).
        channels: decode to 1 or 3 channels (default: as the index says, else as the first image).
    """

    def __init__(
        self,
        urls: str,
        split: Literal["train", "test"] = "train",
        index: str | None = None,
        streams: Annotated[int, Field(ge=1)] = 4,
        shuffle: Annotated[int, Field(ge=0)] = 1000,
        channels: Literal[1, 3] | None = None,
    ):
        self.split, self.streams, self.shuffle = split, streams, shuffle
        self.urls, meta = _resolve(urls, split, index)
        self.counts = meta["counts"]
        if meta.get("shards") is not None:  # counts taken from an index: check them before anything is written
            check_counts(self.urls, self.counts)
        self.channels = channels or meta["channels"]
        self.image_size = meta["image_size"]
        self.classes = meta.get("classes")
        self.num_classes = meta["num_classes"]
        self._starts = np.concatenate([[0], np.cumsum(self.counts)]).tolist()

    def __len__(self) -> int:
        return self._starts[-1]

    # -- the order of one epoch ----------------------------------------------------------------

    def _order(self, epoch: int, seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.randperm(len(self.urls), generator=g).tolist()

    def _range(self, epoch: int, a: int, b: int, seed: int) -> Iterator[dict[str, Any]]:
        """Undecoded samples ``a … b−1`` of epoch ``epoch``'s sequence; whole shards before ``a``
        are not opened, the samples of the first one before ``a`` are read but not decoded."""
        start = 0
        for i in self._order(epoch, seed):
            n = self.counts[i]
            lo, hi = max(a, start), min(b, start + n)
            if lo < hi:
                got = 0
                for sample in islice(raw_samples(self.urls[i]), lo - start, hi - start):
                    got += 1
                    yield sample
                if got < hi - lo:
                    raise DataError(f"shard {self.urls[i]} holds fewer samples than its index says "
                                    f"({self.counts[i]}); rewrite the index or the shard")
            start += n
            if start >= b:
                return

    # -- batches for the trainer (bigmodel.data.loader) -----------------------------------------

    def workers_for(self, num_workers: int) -> int:
        """The DataLoader workers to use: the largest count ≤ ``num_workers`` dividing ``streams``."""
        return max([w for w in range(1, num_workers + 1) if self.streams % w == 0], default=0)

    def step_batches(self, steps: Iterable[int], batch_size: int, seed: int, rank: int = 0, world: int = 1,
                     accum_steps: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images uint8 (b, C, H, W), labels (b,))`` for each of ``steps`` (increasing): rank
        ``rank``'s rows (:func:`~bigmodel.data.loader.rank_rows`) of the step's global batch of
        ``batch_size``, ``b = batch_size / world``. Only the streams these steps draw from are
        opened, and only this rank's samples are decoded."""
        rows = rank_rows(batch_size, accum_steps, rank, world).tolist()
        slots: dict[int, _Slot] = {}
        for t in steps:
            v, pos = t % self.streams, (t // self.streams) * batch_size
            slot = slots.get(v)
            if slot is None or slot.pos != pos:
                slot = slots[v] = _Slot(self, v, self.streams, seed, pos)
            batch = slot.take(batch_size)
            yield _stack([decode(batch[i], self.channels) for i in rows], self)

    # -- plain iteration: every sample once, in shard order (for materialize, re-sharding) -------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for url in self.urls:
            for sample in raw_samples(url):
                yield decode(sample, self.channels)

    def labels(self) -> torch.Tensor:
        return torch.tensor([int(s["cls"].decode()) if "cls" in s else -1
                             for url in self.urls for s in raw_samples(url)], dtype=torch.long)


def _stack(items: list[tuple[torch.Tensor, int]], ds: Shards) -> tuple[torch.Tensor, torch.Tensor]:
    shapes = {tuple(img.shape) for img, _ in items}
    if len(shapes) > 1:
        raise DataError(f"shards {ds.urls[0]}…: images of different sizes {sorted(shapes)} in one batch; "
                        f"rewrite the shards at one size (bigmodel data shard SRC image_size=… DST)")
    return torch.stack([img for img, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


def _resolve(urls: str, split: str, index: str | None) -> tuple[list[str], dict[str, Any]]:
    """Shard URLs and the metadata (counts, channels, image_size, num_classes, classes)."""
    urls = str(expand_path(urls)) if "://" not in urls and not urls.startswith("pipe:") else urls
    folder = Path(urls)
    if folder.is_dir():
        index_path = folder / f"{split}.json"
        if index is None and not index_path.is_file():
            tars = sorted(str(p) for p in folder.glob(f"{split}-*.tar"))
            if not tars:
                raise MissingData(f"data.urls={urls!r}: no {split}.json index and no {split}-*.tar shards there "
                                  f"(write them with: bigmodel data shard SRC split={split} {urls})")
            return tars, _scan(tars)
        return _read_index(Path(index).expanduser() if index else index_path)
    expanded = wds.shardlists.expand_urls(urls.replace("{split}", split))
    if index is None:
        beside = Path(expanded[0]).parent / f"{split}.json"
        if beside.is_file() and Path(expanded[0]).is_file():
            index = str(beside)
    if index is not None:
        listed, meta = _read_index(Path(index).expanduser())
        by_name = dict(zip((Path(u).name for u in listed), meta["counts"], strict=True))
        missing = [u for u in expanded if Path(u).name not in by_name]
        if missing:
            raise ValueError(f"data.index={index!r} does not list {missing[:3]}")
        return expanded, {**meta, "counts": [by_name[Path(u).name] for u in expanded]}
    return expanded, _scan(expanded)


def _read_index(path: Path) -> tuple[list[str], dict[str, Any]]:
    """The shard paths an index lists, with its metadata. An index is data, never code: each entry
    must name a file inside the index's own folder (see :func:`_inside`)."""
    if not path.is_file():
        raise MissingData(f"shard index {path}: no such file")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"shard index {path}: not readable as JSON ({type(e).__name__}: {e}); rewrite it with "
                        f"bigmodel data shard") from e
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise DataError(f"{path}: not a bigmodel shard index (format {found!r}, "
                        f"expected {INDEX_FORMAT!r})")
    shards = meta.get("shards")
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise DataError(f"shard index {path}: 'shards' is not a list of {{url, count}} entries; rewrite it with "
                        f"bigmodel data shard")
    urls = [_inside(path, i, s.get("url")) for i, s in enumerate(shards)]
    counts = [s.get("count") for s in shards]
    bad = next((i for i, c in enumerate(counts) if not isinstance(c, int) or isinstance(c, bool) or c < 0), None)
    if bad is not None:
        raise DataError(f"shard index {path}: entry {bad} ({shards[bad].get('url')!r}) has count {counts[bad]!r}, "
                        f"not a sample count; rewrite the index with bigmodel data shard")
    return urls, {**meta, "counts": counts}


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:, file:, http:, s3:, ... (what webdataset dispatches on)


def _inside(index: Path, i: int, url: Any) -> str:
    """The path of entry ``i`` of ``index``: a relative file name inside the index's folder. A
    ``pipe:`` (a shell command), a URL, an absolute path, ``..`` or a symlink leading out of the
    folder is refused with one line: such URLs are honoured only when written in ``data.urls``."""
    folder = index.parent
    why = None
    if not isinstance(url, str) or not url:
        why = "is not a file name"
    elif _SCHEME.match(url):
        why = "is a command or URL, not a file of the index's folder"
    elif PurePosixPath(url).is_absolute() or ".." in PurePosixPath(url).parts:
        why = "leads out of the index's folder"
    elif not (folder / url).resolve().is_relative_to(folder.resolve()):
        why = "is a link that leads out of the index's folder"
    if why is not None:
        raise DataError(f"shard index {index}: entry {i} {url!r} {why}; an index may only name shard files inside "
                        f"its folder (write a pipe: or remote URL in the recipe's data.urls instead)")
    return str(folder / url)


def _scan(urls: list[str]) -> dict[str, Any]:
    """Count the samples of each shard (reading them once, decoding only the first image)."""
    counts, top, first = [], -1, None
    for url in urls:
        n = 0
        for s in raw_samples(url):
            n += 1
            top = max(top, int(s["cls"].decode()) if "cls" in s else -1)
            if first is None:
                first = s
        counts.append(n)
    if first is None:
        raise DataError(f"shards {urls[0]}…: no samples in {len(urls)} shards")
    img, _ = decode(first, None)
    return {"counts": counts, "channels": img.shape[0], "image_size": img.shape[-1],
            "num_classes": top + 1, "classes": None}


# ---------------------------------------------------------------------------------------------
# Writing


def write_shards(data: ImageDataset, dst: str | Path, split: str, size: int, source: dict[str, Any] | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Write ``data`` as ``dst/{split}-NNNNNN.tar`` shards of ``size`` samples (PNG + cls) and the
    index ``dst/{split}.json``. Returns the index."""
    dst = Path(dst).expanduser()
    dst.mkdir(parents=True, exist_ok=True)
    old = sorted(dst.glob(f"{split}-*.tar")) + sorted(dst.glob(f"{split}.json"))
    if old:
        if not force:
            raise FileExistsError(f"{dst} already holds {split} shards ({old[0].name}, …); use --force to replace them")
        for p in old:
            p.unlink()
    counts: list[int] = []
    written = 0
    with wds.ShardWriter(str(dst / f"{split}-%06d.tar"), maxcount=size, verbose=0) as sink:
        for i, (img, label) in enumerate(_items(data)):
            sample = {"__key__": f"{i:09d}", "png": _png(img)}
            if label >= 0:
                sample["cls"] = str(int(label)).encode()
            sink.write(sample)
            written += 1
        shards = sink.shard
    counts = [size] * (written // size) + ([written % size] if written % size else [])
    counts += [0] * (shards - len(counts))  # ShardWriter opens its first shard even when nothing follows
    index = {
        "format": INDEX_FORMAT, "split": split, "num_samples": written,
        "shards": [{"url": f"{split}-{k:06d}.tar", "count": c} for k, c in enumerate(counts)],
        "channels": data.channels, "image_size": data.image_size, "num_classes": data.num_classes,
        "classes": getattr(data, "classes", None), "source": source or {},
    }
    tmp = dst / f".{split}.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    tmp.replace(dst / f"{split}.json")
    return index


def _png(img: torch.Tensor) -> bytes:
    """uint8 ``(C, H, W)`` → PNG bytes (lossless)."""
    arr = img.numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def _items(data: ImageDataset) -> Iterator[tuple[torch.Tensor, int]]:
    if isinstance(data, TensorImages):  # fast path: no per-item Python indexing of a Dataset
        for img, y in zip(data.images, data.targets.tolist(), strict=True):
            yield img, y
    elif isinstance(data, IterableDataset):
        yield from data
    else:
        for i in range(len(data)):
            img, y = data[i]
            yield img, int(y)
