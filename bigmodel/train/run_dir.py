"""Run directories: one recipe per directory, one process at a time, nothing a user trained lost.

A run directory is identified by where it is, not by the ``run.out`` string that named it: the same
recipe reached through ``./runs/pt``, ``/abs/runs/pt`` or after moving the folder is the same run.
:func:`open_run` checks ``run.out`` is a writable folder, takes the directory's lock, checks the
saved ``recipe.yaml`` against the new recipe, and saves the new one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from bigmodel.data.loader import rank_world
from bigmodel.errors import DiskFull, RecipeError
from bigmodel.recipe import Recipe

LOCK = ".lock"
RELEASED: dict[str, Any] = {"pid": 0, "host": "released"}  # the lock vanished while being read
STALE: dict[str, Any] = {"pid": 0, "host": socket.gethostname()}  # an unreadable, old lock
# Keys of ``run`` that may change between a run and its resumption: where the folder is and how it
# logs, not what it computes.
FREE_RUN_KEYS = ("out", "log_every", "num_workers", "eval_batch_size")


def strip(raw: dict[str, Any]) -> dict[str, Any]:
    """The parts of a recipe that must match for two commands to share a run directory."""
    run = {k: v for k, v in (raw.get("run") or {}).items() if k not in FREE_RUN_KEYS}
    return {**raw, "run": run}


def has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a completed checkpoint (damaged or not: it is work to keep)."""
    return any((Path(run_dir) / "checkpoints").glob("step_*/meta.json"))


def writable_folder(run_dir: Path) -> Path:
    """Create ``run_dir`` if needed. Raises RecipeError when it is a file, lies under a file, or
    cannot be written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"run.out={str(run_dir)!r} is a file, not a folder; choose another run.out")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"run.out={str(run_dir)!r} cannot be created ({e.strerror}); "
                          f"choose a run.out in a folder you can write") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise RecipeError(f"run.out={str(run_dir)!r} is not writable; choose a run.out in a folder you can write")
    return run_dir


def check_recipe(run_dir: Path, recipe: Recipe, console: Console) -> None:
    """Refuse a recipe other than the one ``run_dir`` was trained with, unless it holds no
    checkpoint yet (e.g. a run that failed on a bad setting): then the new recipe takes it over."""
    saved = run_dir / "recipe.yaml"
    if not saved.is_file():
        return
    try:
        previous = yaml.safe_load(saved.read_text())
    except yaml.YAMLError:
        previous = None
    if isinstance(previous, dict) and strip(previous) == strip(recipe.raw):
        return
    if not has_checkpoint(run_dir):
        console.print(f"run.out {run_dir} held no checkpoint: starting afresh with this recipe", highlight=False)
        return
    if not isinstance(previous, dict):
        raise RecipeError(f"run.out={str(run_dir)!r}: its recipe.yaml is unreadable, so the checkpoints there "
                          f"cannot be matched to this recipe; choose another run.out")
    mine, theirs = strip(recipe.raw), strip(previous)
    keys = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    raise RecipeError(f"run.out={str(run_dir)!r} holds a run of a different recipe (sections differ: "
                      f"{', '.join(keys)}); choose another run.out or --resume {run_dir}")


def save_recipe(run_dir: Path, recipe: Recipe) -> None:
    """Write ``recipe.yaml`` atomically. Raises DiskFull when the disk has no room for it (the
    temporary file removed, the previous recipe.yaml kept)."""
    saved = run_dir / "recipe.yaml"
    tmp = saved.with_suffix(".yaml.tmp")
    try:
        tmp.write_text(recipe.to_yaml())
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        tmp.unlink(missing_ok=True)
        raise DiskFull(f"no space left to write {saved} ({e.strerror}, {shutil.disk_usage(run_dir).free:,} bytes "
                       f"free); free some space and rerun the same command") from None
    tmp.replace(saved)


@contextlib.contextmanager
def open_run(recipe: Recipe, console: Console | None = None) -> Iterator[Path]:
    """Check, lock and prepare ``recipe.run.out`` for training; the lock is released on exit.

    Raises:
        RecipeError: ``run.out`` is unusable, in use by another process, or holds checkpoints of a
            different recipe (then nothing in it is changed).
    """
    console = console or Console()
    run_dir = Path(recipe.run.out)
    if rank_world()[0] != 0:  # only rank 0 writes (DESIGN.md §7): it holds the lock for all ranks
        yield run_dir
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise RecipeError(f"run.out={str(run_dir)!r} is a file, not a folder; choose another run.out")
    if run_dir.is_dir():  # refuse a different recipe before creating anything, lock file included
        check_recipe(run_dir, recipe, Console(quiet=True))
    with RunLock(writable_folder(run_dir), console):
        check_recipe(run_dir, recipe, console)  # again, now that no other process can change it
        save_recipe(run_dir, recipe)
        yield run_dir


class RunLock:
    """``RUN/.lock``, created with ``O_EXCL`` and holding ``{"pid", "host", "since"}``: a second
    process training into the same directory is refused; a lock left by a process that no longer
    runs (killed with SIGKILL, a crashed node on this host) is taken over with a note."""

    def __init__(self, run_dir: Path, console: Console | None = None):
        self.path = Path(run_dir) / LOCK
        self.console = console or Console()
        self.held = False

    def __enter__(self) -> RunLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is RELEASED:
                    continue
                if holder is None or _alive(holder):
                    who = "another process" if holder is None else f"process {holder['pid']} on {holder['host']}"
                    raise RecipeError(f"run.out={str(self.path.parent)!r} is in use by {who} (lock {self.path}); "
                                      f"wait for it to end, or delete the lock if that process is gone") from None
                what = ("an unreadable lock" if holder is STALE else
                        f"the lock of process {holder['pid']} on {holder['host']}, which is no longer running")
                self.console.print(f"note: took over {self.path}: {what}", highlight=False)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RecipeError(f"run.out={str(self.path.parent)!r}: other processes keep taking its lock {self.path}")

    def _holder(self) -> dict[str, Any] | None:
        """The lock's holder: ``RELEASED`` if the lock is gone, ``STALE`` if unreadable for more
        than a few seconds, ``None`` if unreadable for less (its process may be writing it)."""
        try:
            holder = json.loads(self.path.read_text())
            return {"pid": int(holder["pid"]), "host": str(holder["host"])}
        except FileNotFoundError:
            return RELEASED
        except (OSError, ValueError, KeyError, TypeError):
            try:
                young = time.time() - self.path.stat().st_mtime < 10
            except FileNotFoundError:
                return RELEASED
            return None if young else STALE

    def __exit__(self, *exc: Any) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock holder may still run (a process on another host is assumed to)."""
    if holder["host"] != socket.gethostname():
        return True
    if holder["pid"] <= 0:
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True
