"""``bigmodel report``: a run's ``report.json`` and ``report.html`` rebuilt from its files alone, and
the figures every run draws at its end (:func:`draw_figures`)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from bigmodel import loader
from bigmodel.analysis import figures
from bigmodel.analysis import report as run_report
from bigmodel.errors import RecipeError


def draw_figures(run_dir: Path, console: Console) -> list[Path]:
    """The run's figures (:func:`bigmodel.analysis.figures.make_all`); a figure that fails is
    reported in one line and does not cost the run its report."""
    try:
        return figures.make_all(run_dir, console)
    except Exception as e:  # noqa: BLE001  (a figure never loses a trained run's report)
        console.print(f"[yellow]figures skipped[/]: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                      highlight=False)
        return []


def report(run_dir: str | Path, console: Console | None = None, figures: bool = True) -> tuple[Path, Path]:
    """Rebuild ``report.json`` and ``report.html`` of a run directory from its files alone (metrics,
    latest checkpoint, ``transfer/*.json``, ``analysis/*``), without retraining and without the
    pretraining data; with ``figures``, (re)draw the figures first. Returns the two paths.

    Raises:
        RecipeError: not a run directory.
        CheckpointError: no intact checkpoint.
    """
    console = console or Console()
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not ((run_dir / "recipe.yaml").is_file() or (run_dir / "checkpoints").is_dir()):
        raise RecipeError(f"report {run_dir}: not a bigmodel run directory (no recipe.yaml or checkpoints/)")
    m = loader.pretraining(run_dir)
    facts = {"backbone_params": m.backbone.num_params(),
             "total_params": sum(p.numel() for p in m.objective.parameters())}
    steps = m.step
    del m
    if figures:
        written = draw_figures(run_dir, console)
        console.print(f"figures: {len(written)} under {run_dir / 'figures'}", highlight=False)
    json_path, html_path = run_report.rebuild(run_dir, model=facts, steps_done=steps)
    console.print(f"report: {json_path}  {html_path}", highlight=False)
    return json_path, html_path
