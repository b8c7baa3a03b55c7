"""The architecture × objective compatibility matrix, from declared capabilities."""

from __future__ import annotations

from rich.table import Table

from bigmodel.registry import ARCHITECTURES, OBJECTIVES


def matrix() -> dict[str, dict[str, list[str]]]:
    """``{architecture: {objective: missing capabilities}}`` for default settings (empty = compatible)."""
    out = {}
    for a in ARCHITECTURES.names():
        have = ARCHITECTURES.get(a).capabilities()
        out[a] = {o: sorted(set(OBJECTIVES.get(o).requires) - have) for o in OBJECTIVES.names()}
    return out


def matrix_table() -> Table:
    m = matrix()
    t = Table(title="architecture × objective (default settings)")
    t.add_column("architecture")
    for o in OBJECTIVES.names():
        t.add_column(o, justify="center")
    for a, row in m.items():
        t.add_row(a, *("✓" if not miss else "needs " + ", ".join(miss) for miss in row.values()))
    return t
