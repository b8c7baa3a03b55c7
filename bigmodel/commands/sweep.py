"""Grid sweeps: ``bigmodel sweep RECIPE key=a,b,c [key2=x,y] [key=value ...] [--out DIR]``.

An override whose value has top-level commas (``optim.lr=1e-3,3e-3``) is an axis of the grid;
commas inside brackets or braces belong to one YAML value (``optim.betas=[0.9,0.95]`` is fixed,
``optim.betas=[0.9,0.95],[0.9,0.99]`` an axis of two). Every other override applies to every run.

Each point of the grid is an ordinary, independent run (the same
:func:`~bigmodel.commands.run.run_pipeline` as ``bigmodel run``) in ``DIR/<its axis overrides>``,
e.g. ``DIR/optim.lr=0.001,data.classes=8``, run one after another. All recipes are validated
before the first run starts. Rerunning the sweep skips runs whose ``report.json`` is there and
resumes a killed one from its checkpoint. At the end ``DIR/compare.json`` and ``DIR/compare.html``
compare the finished runs, and ``DIR/sweep.json`` lists the grid with each run's state.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from bigmodel.analysis import compare
from bigmodel.commands.run import run_pipeline
from bigmodel.errors import NonFiniteLoss
from bigmodel.recipe import Recipe, RecipeError, resolve
from bigmodel.train.run_dir import strip


def split_values(value: str) -> list[str]:
    """``value`` split at its top-level commas (not inside ``[]``, ``{}`` or quotes)."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(value):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def grid(overrides: list[str]) -> tuple[list[list[str]], list[str]]:
    """The grid's points (each a list of ``key=value`` axis overrides, the first axis varying
    slowest) and the fixed overrides."""
    axes, fixed = [], []
    for arg in overrides:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise RecipeError(f"sweep: {arg!r} is not key=value or key=a,b,c")
        if key == "run.out" or key.startswith("run.out."):
            raise RecipeError("sweep: run.out is set by the sweep (DIR/<overrides>); give --out DIR instead")
        values = split_values(value)
        if len(values) == 1:
            fixed.append(arg)
            continue
        if any(not v for v in values):
            raise RecipeError(f"sweep: {arg!r} has an empty value")
        if len(set(values)) < len(values):
            raise RecipeError(f"sweep: {arg!r} repeats a value")
        axes.append([f"{key}={v}" for v in values])
    if not axes:
        raise RecipeError("sweep: no axis to sweep; give at least one key=a,b[,c...]")
    keys = [a[0].partition("=")[0] for a in axes]
    if len(set(keys)) < len(keys):
        raise RecipeError(f"sweep: a key is swept twice ({', '.join(keys)})")
    return [list(p) for p in itertools.product(*axes)], fixed


def run_name(point: list[str]) -> str:
    """The run's folder name: its axis overrides joined by commas (``/`` written as ``_``)."""
    return ",".join(point).replace("/", "_")


def plan(source: str | None, overrides: list[str], out: str | Path) -> list[tuple[str, list[str], Recipe]]:
    """``(name, axis overrides, recipe)`` for every point of the grid, each recipe validated, ``run.out`` set to
    ``out/name``. Raises RecipeError naming the run whose recipe is invalid."""
    points, fixed = grid(overrides)
    planned = []
    for point in points:
        name = run_name(point)
        try:
            recipe = resolve(source, [*fixed, *point, f"run.out={json.dumps(str(Path(out) / name))}"])
        except RecipeError as e:
            raise RecipeError(f"sweep run {name}: {e}") from None
        planned.append((name, point, recipe))
    return planned


def finished(recipe: Recipe) -> bool:
    """Whether ``recipe``'s run directory already holds its report; a report of another recipe
    there is an error (the sweep's settings changed since that run)."""
    run_dir = Path(recipe.run.out)
    if not (run_dir / "report.json").is_file():
        return False
    try:
        saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict) or strip(saved) != strip(recipe.raw):
        raise RecipeError(f"sweep: {run_dir} holds a finished run of a different recipe; "
                          f"choose another --out or remove that folder")
    return True


def sweep(source: str | None, overrides: list[str], out: str | Path | None = None,
          console: Console | None = None, transfer: bool = True) -> dict[str, Any]:
    """Run the grid one after another, then compare the finished runs into ``out``.

    Returns ``{"out", "runs": [{"name", "overrides", "run_dir", "state"}], "compare"}`` where
    ``state`` is ``skipped`` (finished before), ``done``, ``stopped`` (SIGTERM/SIGINT: the sweep
    stops there; rerun it to continue) or ``diverged`` (non-finite loss: the sweep goes on); and
    ``compare`` the :func:`bigmodel.analysis.compare.compare` result (``None`` if no run finished).
    """
    console = console or Console()
    out = Path(out) if out else Path("runs") / f"sweep-{Path(source).stem if source else 'quickstart'}"
    planned = plan(source, overrides, out)
    console.print(f"[bold]bigmodel sweep[/] {len(planned)} runs → {out}", highlight=False)
    runs = []
    for i, (name, point, recipe) in enumerate(planned, 1):
        entry = {"name": name, "overrides": point, "run_dir": recipe.run.out}
        runs.append(entry)
        if finished(recipe):
            entry["state"] = "skipped"
            console.print(f"sweep {i}/{len(planned)} {name}: finished before (report.json), skipped", highlight=False)
            continue
        console.print(f"[bold]sweep {i}/{len(planned)}[/] {name}", highlight=False)
        try:
            result = run_pipeline(recipe, console, transfer=transfer)
        except NonFiniteLoss as e:
            entry["state"] = "diverged"
            console.print(f"[red]sweep run {name} diverged[/]: {e}", highlight=False)
            continue
        if result["pretrain"]["stopped"] or "stopped" in result:
            entry["state"] = "stopped"
            break
        entry["state"] = "done"
    runs += [{"name": n, "overrides": p, "run_dir": r.run.out, "state": "pending"}
             for n, p, r in planned[len(runs):]]
    done = [e["run_dir"] for e in runs if (Path(e["run_dir"]) / "report.json").is_file()]
    result = {"out": str(out), "runs": runs, "compare": compare.compare(done) if done else None}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps({"out": str(out), "runs": runs}, indent=1))
    if result["compare"] is not None:
        json_path, html_path = compare.write(result["compare"], out)
        console.print(f"compare: {json_path}  {html_path}", highlight=False)
    return result
