"""Clean stops on SIGTERM/SIGINT (DESIGN.md §8): the loop finishes its step, checkpoints and exits
(preemption on clusters)."""

from __future__ import annotations

import signal
from typing import Any


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
