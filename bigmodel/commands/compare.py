"""``bigmodel compare``: finished run directories in one table with plots and power-law fits (the
work is :mod:`bigmodel.analysis.compare`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from bigmodel.analysis import compare as cmp


def compare(run_dirs: list[str | Path], out: str | Path | None = None,
            console: Console | None = None) -> dict[str, Any]:
    """Compare finished run directories (see :mod:`bigmodel.analysis.compare`): one table, plots
    and power-law fits; writes ``compare.json`` and ``compare.html`` into ``out`` when given."""
    console = console or Console()
    result = cmp.compare(run_dirs)
    console.print(f"[bold]bigmodel compare[/] {len(result['rows'])} runs, "
                  f"{len(result['columns'])} task · protocol columns", highlight=False)
    if out is not None:
        json_path, html_path = cmp.write(result, out)
        console.print(f"compare: {json_path}  {html_path}", highlight=False)
    return result
