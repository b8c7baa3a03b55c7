"""``bigmodel run`` and ``bigmodel pretrain``: the main job, pretrain → transfer suite (pretrained
vs random-init twin vs pixels) → report, and ``bigmodel.run``, its scripting face.

Everything that can fail on bad input (validation, building the data and the model) happens before
the run directory is touched. The pretraining itself is :func:`bigmodel.commands.pretrain.pretrain`
(the entry point over the one loop), the suite :func:`bigmodel.transfer.runner.run_suite`, the
figures and the report :mod:`bigmodel.commands.report`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from bigmodel.analysis import flops
from bigmodel.analysis import report as run_report
from bigmodel.commands.pretrain import pretrain
from bigmodel.commands.report import draw_figures
from bigmodel.errors import InputError
from bigmodel.recipe import (
    Recipe,
    RecipeError,
    dotted_overrides,
    load_raw,
    parse_override,
    resolve_raw,
    validate,
)
from bigmodel.train import build, checkpoint, distributed
from bigmodel.train.run_dir import open_run
from bigmodel.train.signals import GracefulStop
from bigmodel.transfer import monitor, suites
from bigmodel.transfer.runner import PIXELS, provenance, read_partial, run_suite, table, task_label, write_partial

Overrides = Mapping[str, Any] | Sequence[str] | None


def resolve_recipe(recipe: str | Path | dict[str, Any] | Recipe | None = "quickstart", overrides: Overrides = None,
                   *, note: Callable[[str], None] | None = None) -> Recipe:
    """A validated recipe from a zoo name, a YAML path, a recipe dict (the YAML's contents) or a
    :class:`Recipe`, with ``overrides`` applied exactly as the CLI applies ``section.key=value``
    (same precedence over ``tiny``, same component switches, same errors).

    Args:
        overrides: dotted keys to values, ``{"optim.steps": 10, "run.tiny": True}`` (values as
            YAML would parse the CLI's ``optim.steps=10``), or the CLI's ``["optim.steps=10"]``.
            On a :class:`Recipe` they apply to its resolved values (its ``tiny`` keys are not
            applied a second time).
        note: receives notes such as dropped tiny keys (default: printed to stderr, as the CLI).

    Raises:
        RecipeError: the message the CLI prints after ``recipe error:``.
    """
    if overrides is None:
        parsed = []
    elif isinstance(overrides, Mapping):
        parsed = dotted_overrides(overrides)
    elif isinstance(overrides, str):
        raise TypeError(f"overrides: a dict or a list of 'section.key=value' strings, not the string {overrides!r}")
    else:
        parsed = [parse_override(o) for o in overrides]
    if isinstance(recipe, Recipe):
        return resolve_raw(recipe.raw, parsed, note, apply_tiny=False) if parsed else recipe
    if isinstance(recipe, dict):
        return resolve_raw(recipe, parsed, note)
    if recipe is None or isinstance(recipe, str | Path):
        return resolve_raw(load_raw(recipe), parsed, note)
    raise TypeError(f"recipe: a zoo name, a YAML path, a dict or a Recipe, not {type(recipe).__name__}")



@dataclass(frozen=True)
class Result:
    """What :func:`run` (``bigmodel.run``) returns.

    Attributes:
        run_dir: the run directory (``run.out``).
        report: ``report.json`` as written (recipe, pretrain summary, model size and FLOPs, the
            transfer rows, loss curves, figures); for a stopped run, what was done so far, as JSON.
    """

    run_dir: Path
    report: dict[str, Any]

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The transfer rows: ``task``, ``protocol``, their settings and ``results`` per subject
        (``pretrained``, ``random_init``, ``pixels``), each with ``top1``."""
        return self.report.get("transfer", [])

    @property
    def stopped(self) -> str | None:
        """``"pretrain"`` or ``"transfer"`` when SIGTERM/SIGINT stopped the run there (running the
        same recipe again resumes it), else ``None``."""
        if self.report["pretrain"]["stopped"]:
            return "pretrain"
        return "transfer" if "stopped" in self.report else None

    def top1(self, task: str, protocol: str, subject: str = "pretrained") -> float:
        """Top-1 % of ``subject`` in the one row of ``task`` (its name or file stem) · ``protocol``."""
        found = [r for r in self.rows if task_label(r) == task and r["protocol"] == protocol]
        if len(found) != 1:
            have = ", ".join(f"{task_label(r)} · {r['protocol']}" for r in self.rows) or "none"
            raise KeyError(f"{len(found)} rows for {task} · {protocol} (rows: {have})")
        return found[0]["results"][subject]["top1"]


def run(recipe: str | Path | dict[str, Any] | Recipe | None = "quickstart", overrides: Overrides = None,
        *, transfer: bool = True, quiet: bool = False, console: Console | None = None) -> Result:
    """``bigmodel.run``: pretrain, transfer and report, as ``bigmodel run`` (``transfer=False``: as
    ``bigmodel pretrain``). ``recipe`` and ``overrides`` as :func:`resolve_recipe`; ``quiet``
    silences the progress and tables (``console``, for the CLI, replaces it).

    A run stopped by SIGTERM/SIGINT returns with :attr:`Result.stopped` set; calling again resumes.

    Raises:
        RecipeError: a recipe, data or run-directory problem, before anything is written.
        NonFiniteLoss: training diverged; the last good checkpoint is kept.
    """
    resolved = resolve_recipe(recipe, overrides)
    summary = run_pipeline(resolved, console or Console(quiet=quiet), transfer=transfer)
    run_dir = Path(resolved.run.out)
    finished = not summary["pretrain"]["stopped"] and "stopped" not in summary
    if finished and (run_dir / "report.json").is_file():  # written by this run
        return Result(run_dir, json.loads((run_dir / "report.json").read_text()))
    return Result(run_dir, json.loads(json.dumps(summary, default=str)))  # typed as report.json would be


def load_recipe(run_dir: Path) -> Recipe:
    """The recipe a run directory was trained with, its ``run.out`` set to ``run_dir`` (wherever
    the folder is now: a run directory is identified by its place, not by the ``run.out`` it was
    created with)."""
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise RecipeError(f"--resume {run_dir}: no recipe.yaml there; is it a bigmodel run directory?")
    raw = yaml.safe_load(path.read_text())
    raw.setdefault("run", {})["out"] = str(run_dir)
    return validate(raw)


def run_pipeline(recipe: Recipe, console: Console | None = None, transfer: bool = True) -> dict[str, Any]:
    """Pretrain, transfer and report a validated recipe (``bigmodel run``; ``transfer=False``:
    ``bigmodel pretrain``). Returns the report dict (also written to report.json).

    ``run.out`` is locked for the duration (see :mod:`bigmodel.train.run_dir`). SIGTERM/SIGINT stop
    it cleanly, without a report: during pretraining at a checkpoint (``result["pretrain"]["stopped"]``),
    during transfer after the row in progress, the rows done kept in ``RUN/transfer/partial.json``
    (``result["stopped"] = {"phase": "transfer", "rows_done", "rows"}``). Running the same recipe
    again resumes either: pretraining from its checkpoint, transfer with the missing rows only.
    """
    console = console or Console()
    t0 = time.perf_counter()
    try:
        data, model = build.experiment(recipe)
        distributed.check(recipe, model)  # batch vs process count, activation checkpointing: before run.out is touched
        if transfer:
            suites.check(recipe.transfer)  # e.g. kNN k above the task's images: refused before pretraining
        monitor.check(recipe.run.monitor)  # its task (a missing file) and protocol, before run.out is touched
    except InputError:  # a missing data file (DataError) says so itself
        raise
    except (ValueError, FileNotFoundError) as e:  # problems only building reveals, still before any write
        raise RecipeError(str(e)) from e
    with open_run(recipe, console) as run_dir:  # run.out checked and locked; recipe.yaml saved
        return _run_locked(recipe, run_dir, data, model, console, transfer, t0)


def _run_locked(recipe: Recipe, run_dir: Path, data: Any, model: Any, console: Console, transfer: bool,
                t0: float) -> dict[str, Any]:
    if not distributed.is_main():  # under torchrun only rank 0 prints, measures, transfers and reports (DESIGN §7)
        console = Console(quiet=True)
    console.print(f"[bold]bigmodel run[/] → {run_dir}   {recipe.architecture.name} × {recipe.data.name} × "
                  f"{recipe.objective.name}   ({len(data)} training images)")
    skipped = getattr(data, "skipped", [])  # unreadable files a dataset left out (imagefolder)
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} unreadable files[/] (listed in report.json): "
                      + "; ".join(f"{p} ({r})" for p, r in skipped[:5]) + (" …" if len(skipped) > 5 else ""))
    summary = pretrain(recipe, run_dir, data, model, console)
    result: dict[str, Any] = {"recipe": recipe.raw,
                              "pretrain": {**summary, "seconds": round(time.perf_counter() - t0, 1)}}
    if not distributed.is_main():
        return result
    ignored = getattr(data, "ignored", [])  # files that are not images by extension (imagefolder)
    if skipped or ignored:
        result["data"] = {"skipped": [{"path": p, "reason": r} for p, r in skipped], "ignored": list(ignored)}
    if summary["stopped"]:
        return result
    backbone = model.backbone
    result["model"] = {"backbone_params": backbone.num_params(),
                       "total_params": sum(p.numel() for p in model.parameters()),
                       **flops.for_run(recipe, data, model, world=summary["processes"])}
    if transfer and recipe.transfer:
        t1 = time.perf_counter()
        dev = build.device(recipe.run)
        dtype = build.autocast_dtype(recipe.run, dev)
        prov = provenance(checkpoint.latest(run_dir / "checkpoints"), summary["steps_done"], dtype, str(dev))
        partial = run_dir / "transfer" / "partial.json"
        done = read_partial(partial, summary["steps_done"])
        if done:
            console.print(f"transfer: {len(done)} of {len(recipe.transfer)} rows already scored ({partial})",
                          highlight=False)
        # one device for every subject, the one `bigmodel transfer RUN` loads the checkpoint on (after
        # FSDP the gathered model is in host memory)
        subjects = {"pretrained": backbone.to(dev), "random_init": build.random_twin(recipe, data).to(dev),
                    PIXELS: None}

        def keep(key: str, row: dict[str, Any]) -> None:  # each row is saved as soon as it is scored
            done[key] = row
            write_partial(partial, done, prov)

        with GracefulStop() as stop:  # SIGTERM/SIGINT: finish the row in progress, keep the rows done
            rows = run_suite(recipe.transfer, subjects, recipe.run.eval_batch_size, dtype, console,
                             done=done, on_row=keep, stop=stop)
        result["transfer"] = rows
        result["transfer_provenance"] = prov
        if len(rows) < len(recipe.transfer):
            result["stopped"] = {"phase": "transfer", "rows_done": len(rows), "rows": len(recipe.transfer)}
            return result
        result["transfer_seconds"] = round(time.perf_counter() - t1, 1)
        console.print(table(rows))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if recipe.run.figures:  # PNGs under RUN/figures, embedded by run_report.write
        draw_figures(run_dir, console)
    json_path, html_path = run_report.write(run_dir, result)
    (run_dir / "transfer" / "partial.json").unlink(missing_ok=True)  # its rows are in report.json now
    console.print(f"report: {json_path}  {html_path}   ({result['seconds']:.0f}s)")
    return result
