"""Utilities for tests that run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path | None = None, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Run ``python -m bigmodel ARGS`` with the repo importable; returns the completed process."""
    return subprocess.run([sys.executable, "-m", "bigmodel", *args], cwd=cwd or REPO, env=env(),
                          capture_output=True, text=True, timeout=timeout, **popen)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    e["OMP_NUM_THREADS"] = "1"  # as tests/conftest.py
    e["COLUMNS"] = "120"
    return e
