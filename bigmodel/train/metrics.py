"""Run-time output: ``metrics.jsonl`` (and TensorBoard events), and a progress line with loss,
images/s and ETA.

``metrics.jsonl`` holds one JSON object per logged step. A kill can tear its last line (the process
dies inside ``write``): readers skip a line that does not parse, and a resumed run drops it with a
note, so the file reads as the uninterrupted run's."""

from __future__ import annotations

import errno
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from bigmodel.errors import DiskFull, RecipeError


class MetricsLog:
    """Append-only JSON lines. On resume, lines past the checkpoint's step are dropped so that the
    file reads as if the run had never stopped; so is a line torn by a kill (it does not parse),
    with one note through ``note`` (default: a line on stderr).

    With ``tensorboard`` (a folder), every record's numbers also go to TensorBoard event files
    there, one scalar per key under ``train/``; on resume the events past the checkpoint's step
    are purged (``SummaryWriter(purge_step=...)``) for the same reason."""

    def __init__(self, path: Path, resume_step: int = 0, tensorboard: Path | None = None,
                 note: Callable[[str], None] | None = None):
        self.path = path
        if path.exists():
            records, torn = _parse(path.read_text())
            if torn:
                (note or _note)(f"{path}: dropped {_lines(torn)} that did not parse (torn by a kill during a write)")
            keep = [ln for ln, rec in records if rec.get("step", 0) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")  # rewritten atomically: a kill now loses nothing
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(path)
        self.tb = None
        if tensorboard is not None:
            self.tb = tensorboard_writer()(str(tensorboard), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left to write {self.path} ({e.strerror}); free space on that disk and "
                               f"rerun the same command to resume from the last checkpoint") from None
            raise
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _parse(text: str) -> tuple[list[tuple[str, dict[str, Any]]], list[int]]:
    """The ``(line, record)`` pairs of a metrics file, and the (1-based) numbers of the lines that
    are not a JSON object (a torn last line)."""
    records, torn = [], []
    for i, ln in enumerate(text.splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
        except ValueError:
            rec = None
        if isinstance(rec, dict):
            records.append((ln, rec))
        else:
            torn.append(i)
    return records, torn


def _lines(numbers: list[int]) -> str:
    return f"line {numbers[0]}" if len(numbers) == 1 else f"lines {', '.join(map(str, numbers))}"


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def tensorboard_writer() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line error saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch imports the tensorboard package lazily, here
        raise RecipeError("run.tensorboard=true needs the tensorboard package: pip install 'bigmodel[tensorboard]' "
                          "(or set run.tensorboard=false)") from e
    return SummaryWriter


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (none if it does not exist), a torn line skipped."""
    return [rec for _, rec in _parse(Path(path).read_text())[0]] if Path(path).exists() else []


class StepProgress:
    """A rich progress bar on a terminal; plain log lines otherwise (CI logs, pipes)."""

    def __init__(self, console: Console, total: int, start: int, label: str):
        self.console, self.total = console, total
        self.live = console.is_terminal
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=console,
                            disable=not self.live)
        self.task = self.bar.add_task(label, total=total, completed=start, info="")
        self.t0, self.s0 = time.perf_counter(), start

    def __enter__(self) -> StepProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def update(self, step: int, scalars: dict[str, float]) -> None:
        info = "  ".join(f"{k} {v:.4g}" for k, v in scalars.items())
        self.bar.update(self.task, completed=step, info=info)
        if not self.live:
            rate = (step - self.s0) / max(time.perf_counter() - self.t0, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            self.console.print(f"step {step}/{self.total}  {info}  eta {eta:.0f}s", highlight=False)
