"""The bad-input suite's one shape: a row is a command, the exit status, the one line it must
print, and what must and must not exist afterwards (DESIGN.md §8: nothing a user trained is lost).

Each file in this folder holds the rows of one area (run directories, data, the command line) and
runs them with :func:`check`. Commands run in-process through ``bigmodel.cli.main`` (fast) unless a
row needs a real process (signals, locks held by another pid), which uses ``tests.helpers.cli``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest


@dataclasses.dataclass
class Case:
    """One bad input.

    Attributes:
        id: short name shown by pytest.
        argv: the ``bigmodel`` arguments; ``{tmp}`` is replaced by the test's temporary folder.
        status: expected exit status (2 bad input, 3 stopped by a signal, ...).
        line: a substring of the one line the command must print on stderr for the error.
        setup: prepares ``tmp`` (writes bad files, runs a first command, ...).
        exists / absent: paths relative to ``tmp`` that must / must not exist afterwards.
        check: any further assertion on ``tmp`` (e.g. an earlier checkpoint is untouched).
    """

    id: str
    argv: list[str]
    status: int
    line: str
    setup: Callable[[Path], None] | None = None
    exists: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()
    check: Callable[[Path], None] | None = None


def params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id) for c in cases]


def check(case: Case, tmp: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run ``case`` in ``tmp`` (also the working directory) and assert all it states.
    Returns stderr, for extra assertions."""
    from bigmodel.cli import main

    monkeypatch.chdir(tmp)
    if case.setup is not None:
        case.setup(tmp)
    capsys.readouterr()
    status = main([a.replace("{tmp}", str(tmp)) for a in case.argv])
    out, err = capsys.readouterr()
    assert status == case.status, f"exit {status}, expected {case.status}; stderr: {err[-2000:]}"
    if case.status != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err[-2000:]}"
        assert "Traceback" not in err
    assert case.line in err, f"{case.line!r} not in stderr: {err[-2000:]}"
    for rel in case.exists:
        assert (tmp / rel).exists(), f"{rel} should exist"
    for rel in case.absent:
        assert not (tmp / rel).exists(), f"{rel} should not exist"
    if case.check is not None:
        case.check(tmp)
    return err
