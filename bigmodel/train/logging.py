"""Run-time output: metrics.jsonl, a progress line with loss, images/s and ETA, and clean stops."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class MetricsLog:
    """Append-only JSON lines. On resume, lines past the checkpoint's step are dropped so that the
    file reads as if the run had never stopped.

    With ``tensorboard`` (a folder), every record's numbers also go to TensorBoard event files
    there, one scalar per key under ``train/``; on resume the events past the checkpoint's step
    are purged (``SummaryWriter(purge_step=...)``) for the same reason."""

    def __init__(self, path: Path, resume_step: int = 0, tensorboard: Path | None = None):
        self.path = path
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in keep))
        self.tb = None
        if tensorboard is not None:
            self.tb = tensorboard_writer()(str(tensorboard), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def tensorboard_writer() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or a one-line error saying how to install it."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch imports the tensorboard package lazily, here
        from bigmodel.recipe import RecipeError

        raise RecipeError("run.tensorboard=true needs the tensorboard package: pip install 'bigmodel[tensorboard]' "
                          "(or set run.tensorboard=false)") from e
    return SummaryWriter


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()] if Path(path).exists() else []


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


class GracefulStop:
    """SIGTERM/SIGINT set a flag: the loop finishes its step, checkpoints and exits."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
