"""Shard files checked against their index before anything is written: a local shard holding fewer
samples than ``train.json`` says is refused when the dataset is built, not at the training step that
reaches it (:mod:`bigmodel.data.shards` calls :func:`check_counts`)."""

from __future__ import annotations

import re
import tarfile
from pathlib import Path

from bigmodel.errors import DataError


def check_counts(urls: list[str], counts: list[int]) -> None:
    """Refuse a local shard holding fewer samples than its index says, when the dataset is built (before
    a run directory is written) rather than at the step that reaches it. Only the tar headers are read
    (:func:`tar_samples`); remote shards, and files that are not plain tars, are checked as they are read."""
    for url, n in zip(urls, counts, strict=True):
        if n and Path(url).is_file():
            got = tar_samples(Path(url))
            if got is not None and got < n:
                raise DataError(f"shard {url} holds fewer samples than its index says ({got} of {n}); "
                                f"rewrite the index or the shard")


_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skipped members (tar_file_iterator's skip_meta)
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: the sample key of a member


def tar_samples(path: Path) -> int | None:
    """The samples of a plain (uncompressed) tar as webdataset groups them: runs of regular members
    sharing a key, counting only members stored whole. The standard library's ``tarfile`` reads one
    header per member and seeks over the data (GNU long names and pax headers included). ``None``
    when the file is not an uncompressed tar (compressed shards are checked as they are read)."""
    samples, key = 0, None
    try:
        size = path.stat().st_size
        tar = tarfile.open(path, "r:") if size else None
    except (OSError, tarfile.TarError):
        return None  # not a plain tar, or unreadable here: reading the shard reports it
    if tar is None:
        return 0
    with tar:
        try:
            for m in tar:
                if not m.isfile() or m.offset_data + m.size > size:  # cut short: not whole
                    continue
                match = None if _META.match(m.name) else _KEY.match(m.name)
                if match and match.group(1) != key:
                    samples, key = samples + 1, match.group(1)
        except (OSError, tarfile.TarError):
            pass  # a truncated tail: the members before it count
    return samples
