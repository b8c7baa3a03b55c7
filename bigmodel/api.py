"""The Python API; the CLI is a thin layer over it.

Scripts use the functions ``import bigmodel`` exposes, defined in the first section here:
``bigmodel.run`` (:func:`run_recipe`) → :class:`Result`, ``bigmodel.load`` (:func:`load`) →
:class:`Pretrained`, ``bigmodel.transfer`` (:func:`transfer_task`) → one transfer row, and
``bigmodel.resolve_recipe``. The CLI commands call the functions of the second section, which
take a validated :class:`Recipe` and a console and return plain dicts.

``run`` is the main job: pretrain → transfer suite (pretrained vs random-init twin vs pixels) →
report. Everything that can fail on bad input (validation, building the data and the model)
happens before the run directory is touched.
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
from bigmodel.analysis import report as run_report  # `report` is the function below
from bigmodel.commands.pretrain import pretrain
from bigmodel.errors import CheckpointError
from bigmodel.loader import Pretrained, load, load_backbone, run_dir_of  # noqa: F401  (the API's loader)
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
from bigmodel.train.signals import GracefulStop
from bigmodel.train.run_dir import open_run
from bigmodel.transfer import score as _score
from bigmodel.transfer import suites
from bigmodel.transfer.runner import (
    PIXELS,
    provenance,
    read_partial,
    run_suite,
    table,
    task_label,
    write_partial,
)

transfer_task = _score.score  # bigmodel.transfer
transfer = _score.score_checkpoint  # bigmodel transfer

# ---------------------------------------------------------------------------------------------
# Scripting: what ``import bigmodel`` exposes (bigmodel.run, .load, .transfer, .resolve_recipe).
# The same work as the CLI commands, with typed arguments, quiet when asked, returning objects.

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
    """What :func:`run_recipe` (``bigmodel.run``) returns.

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


def run_recipe(recipe: str | Path | dict[str, Any] | Recipe | None = "quickstart", overrides: Overrides = None,
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
    summary = run(resolved, console or Console(quiet=quiet), transfer=transfer)
    run_dir = Path(resolved.run.out)
    finished = not summary["pretrain"]["stopped"] and "stopped" not in summary
    if finished and (run_dir / "report.json").is_file():  # written by this run
        return Result(run_dir, json.loads((run_dir / "report.json").read_text()))
    return Result(run_dir, json.loads(json.dumps(summary, default=str)))  # typed as report.json would be


# ---------------------------------------------------------------------------------------------
# What the CLI commands call (a console for progress and tables; results as dicts)


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


def run(recipe: Recipe, console: Console | None = None, transfer: bool = True) -> dict[str, Any]:
    """Pretrain, transfer and report. Returns the report dict (also written to report.json).

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
    result: dict[str, Any] = {"recipe": recipe.raw, "pretrain": {**summary, "seconds": round(time.perf_counter() - t0, 1)}}
    if not distributed.is_main():
        return result
    ignored = getattr(data, "ignored", [])  # files that are not images by extension (imagefolder)
    if skipped or ignored:
        result["data"] = {"skipped": [{"path": p, "reason": r} for p, r in skipped], "ignored": list(ignored)}
    if summary["stopped"]:
        return result
    backbone = model.backbone
    result["model"] = {"backbone_params": backbone.num_params(), "total_params": sum(p.numel() for p in model.parameters()),
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
        _figures(run_dir, console)
    json_path, html_path = run_report.write(run_dir, result)
    (run_dir / "transfer" / "partial.json").unlink(missing_ok=True)  # its rows are in report.json now
    console.print(f"report: {json_path}  {html_path}   ({result['seconds']:.0f}s)")
    return result


def ensemble(ckpts: list[str | Path], task: str | dict[str, Any], sets: list[str] | tuple[str, ...] = (),
             console: Console | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune each checkpoint's backbone on ``task`` (a dataset name, an ``.npz`` path or a task
    section) and score the mean-probability ensemble against each member; ``sets`` adjust the
    task (``task.KEY=VALUE``) and the finetune protocol (``KEY=VALUE``). Writes JSON to ``out``."""
    from bigmodel.registry import PROTOCOLS
    from bigmodel.transfer import ensemble as ens

    console = console or Console()
    task = suites.task_entry(task) if isinstance(task, str) else task
    spec = suites.specs([{"task": task, "protocol": "finetune"}], sets)[0]
    protocol = PROTOCOLS.build("finetune", **spec.protocol.kwargs)
    train, test = suites.task_splits(spec.task)
    try:
        protocol.check(train.targets)
    except ValueError as e:
        raise RecipeError(f"ensemble on {suites.entry_name({'task': task})}: {e}") from None
    members, steps = [], []
    for ckpt in ckpts:
        net, found, _ = load_backbone(ckpt)
        members.append((str(ckpt), net))
        steps.append(checkpoint.load_meta(found)["step"])
    console.print(f"[bold]bigmodel ensemble[/] {len(members)} members on {suites.entry_name({'task': task})} "
                  f"({len(train)} train / {len(test)} test images): fine-tuning each in turn")
    result = ens.ensemble(members, train, test, protocol, console)
    result = {"task": spec.task.name, "task_settings": spec.task.kwargs, **result}
    for member, step in zip(result["members"], steps, strict=True):
        member["step"] = step
    result["provenance"] = provenance(device=str(next(members[0][1].parameters()).device), sets=list(sets),
                                      checkpoints=[str(c) for c in ckpts])
    console.print(ens.table(result))
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        console.print(f"ensemble report: {out}")
    return result


def compare(run_dirs: list[str | Path], out: str | Path | None = None,
            console: Console | None = None) -> dict[str, Any]:
    """Compare finished run directories (see :mod:`bigmodel.analysis.compare`): one table, plots
    and power-law fits; writes ``compare.json`` and ``compare.html`` into ``out`` when given."""
    from bigmodel.analysis import compare as cmp

    console = console or Console()
    result = cmp.compare(run_dirs)
    console.print(f"[bold]bigmodel compare[/] {len(result['rows'])} runs, {len(result['columns'])} task · protocol columns",
                  highlight=False)
    if out is not None:
        json_path, html_path = cmp.write(result, out)
        console.print(f"compare: {json_path}  {html_path}", highlight=False)
    return result


def sweep(source: str | None, overrides: list[str], out: str | Path | None = None,
          console: Console | None = None, transfer: bool = True) -> dict[str, Any]:
    """Run the grid of ``overrides`` (``key=a,b,c`` axes, other ``key=value`` fixed) one run after
    another, resumable, then compare them into ``out`` (see :mod:`bigmodel.sweep`)."""
    from bigmodel import sweep as sw

    return sw.sweep(source, overrides, out, console, transfer)


def analyze(run_dir: str | Path, task: str, limit: int | None = None, against: str | Path | None = None,
            console: Console | None = None, finetune: list[str] | None = None) -> dict[str, Any]:
    """Layer-wise transfer analysis of a checkpoint on ``task`` (a dataset name or an ``.npz`` path):
    a linear probe on every block of the pretrained backbone and of its random-init twin
    (:mod:`bigmodel.analysis.layerwise`), and linear CKA between every pair of their layers on the
    task's test images (:mod:`bigmodel.analysis.cka`): pretrained vs the twin, or vs the backbone of
    ``against`` (a run directory or checkpoint folder of the same architecture), or vs a copy of the
    backbone fine-tuned on the task's train split when ``finetune`` is given (``KEY=VALUE`` settings
    of the finetune protocol; ``[]`` for its defaults): which layers does fine-tuning change?
    ``limit`` keeps the first ``limit`` images of each split.

    Writes ``RUN/analysis/layerwise-<task>.json|png`` and ``RUN/analysis/cka-<a>-vs-<b>.json|png``;
    returns ``{"layerwise": ..., "cka": ..., "files": [...]}``.

    The twin is built without the pretraining data (an analysis needs the run directory only); data-
    dependent state fitted before training (ImageGPT's and the causal LSTM's colour palette) is
    copied from the checkpoint, which holds exactly what the objective's setup fitted.
    """
    import re

    import torch

    from bigmodel.analysis import cka, layerwise
    from bigmodel.transfer.linear import Linear

    console = console or Console()
    if limit is not None and limit < 2:
        raise RecipeError(f"--limit {limit}: must be at least 2 images per split")
    net, found, recipe = load_backbone(run_dir)
    other = None
    if against is not None and finetune is not None:
        raise RecipeError("give --against or --finetune, not both")
    if against is not None:
        try:
            other, found_b, recipe_b = load_backbone(against)
        except CheckpointError as e:
            raise CheckpointError(f"--against {e}") from None
        if recipe_b.raw["architecture"] != recipe.raw["architecture"]:
            raise RecipeError(f"--against {against}: its architecture {recipe_b.raw['architecture']} differs from "
                              f"{recipe.raw['architecture']}; CKA here compares layers of the same architecture")
    entry = suites.task_entry(task)
    try:
        spec = suites.specs([{"task": entry, "protocol": "linear"}])[0]
    except RecipeError as e:
        raise RecipeError(f"--task {task}: {str(e).removeprefix('transfer.0.')}") from None
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", suites.entry_name({"task": entry}))
    try:
        train, test = suites.task_splits(spec.task)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(f"--task {task}: {str(e).splitlines()[0]}") from e
    if limit is not None:
        train, test = (d.subset(torch.arange(min(limit, len(d)))) for d in (train, test))
    finetuned = None
    if finetune is not None:
        finetuned = _finetuned_copy(net, entry, finetune, train, test, console)
        other = finetuned.pop("backbone")
    twin = build.random_twin(recipe, pretrained=net).to(next(net.parameters()).device)
    dev = build.device(recipe.run)
    dtype = build.autocast_dtype(recipe.run, dev)
    out = run_dir_of(found) / "analysis"
    console.print(f"[bold]bigmodel analyze[/] {found} on {name} ({len(train)} train / {len(test)} test images)",
                  highlight=False)
    try:
        probed = layerwise.probe(net, twin, train, test, Linear(), recipe.run.eval_batch_size, dtype, console)
    except ValueError as e:
        raise RecipeError(f"analyze on {name}: {e}") from None
    feats = probed.pop("features")
    prov = provenance(found, checkpoint.load_meta(found)["step"], dtype, str(dev), task=name,
                      train_images=len(train), test_images=len(test))
    lw = {**probed, "task": name, "provenance": prov}
    lw_json = out / f"layerwise-{name}.json"
    out.mkdir(parents=True, exist_ok=True)
    lw_json.write_text(json.dumps(lw, indent=1, default=str))
    lw_png = layerwise.curve_png(probed["rows"], out / f"layerwise-{name}.png",
                                 f"{recipe.architecture.name} × {recipe.objective.name}: linear probe per block, {name} "
                                 f"({len(train)} train / {len(test)} test)")
    # CKA on the test images' block features
    a_feats = [(n, te) for n, (_, te) in feats["pretrained"].items()]
    if other is None:
        b_label = "random_init"
        b_feats = [(n, te) for n, (_, te) in feats["random_init"].items()]
    else:
        b_label = "finetuned" if finetuned is not None else re.sub(r"[^A-Za-z0-9_.-]+", "_", run_dir_of(found_b).name)
        b_feats = layerwise.block_features(other.to(dev), test, recipe.run.eval_batch_size, dtype, console,
                                           f"block features test · {b_label}")
    source = {"finetune": finetuned} if finetuned is not None else {"against": str(found_b)} if other is not None else {}
    sim = {**cka.matrix(a_feats, b_feats), "a": "pretrained", "b": b_label, "task": name, "images": len(test),
           "provenance": {**prov, **source}}
    stem = f"cka-pretrained-vs-{b_label}"
    cka_json = out / f"{stem}.json"
    cka_json.write_text(json.dumps(sim, indent=1, default=str))
    cka_png = cka.heatmap_png(sim, out / f"{stem}.png", "pretrained", b_label,
                              f"linear CKA on {len(test)} {name} test images")
    console.print(_analysis_table(lw["rows"], sim))
    files = [lw_json, lw_png, cka_json, cka_png]
    console.print("analysis: " + "  ".join(str(f) for f in files), highlight=False)
    return {"layerwise": lw, "cka": sim, "files": [str(f) for f in files]}


def _finetuned_copy(net: Any, entry: dict[str, Any], sets: list[str], train: Any, test: Any,
                    console: Console) -> dict[str, Any]:
    """Fine-tune a copy of ``net`` on ``train`` with the finetune protocol (``KEY=VALUE`` settings);
    returns its settings, schedule, test top-1 and the fine-tuned ``backbone``."""
    from bigmodel.registry import PROTOCOLS

    try:
        spec = suites.specs([{"task": entry, "protocol": "finetune"}], sets)[0]
    except RecipeError as e:
        raise RecipeError(f"--finetune: {str(e).removeprefix('transfer.0.')}") from None
    protocol = PROTOCOLS.build("finetune", **spec.protocol.kwargs)
    model, schedule = protocol.fit(net, train, console=console)
    top1 = 100.0 * (protocol.predict_proba(model, test).argmax(1) == test.targets).float().mean().item()
    console.print(f"fine-tuned copy: top-1 {top1:.2f}% on the test split", highlight=False)
    return {"settings": protocol.settings(), "schedule": schedule.as_dict(), "top1": top1,
            "backbone": model.backbone}


def _analysis_table(rows: list[dict[str, Any]], sim: dict[str, Any]) -> Any:
    """One line per block: probe accuracy pretrained / twin, and CKA with the other backbone's block
    at the same depth (the diagonal, where both have that block)."""
    from rich.table import Table

    t = Table(title=f"per-block linear probe · CKA vs {sim['b']} (same block)")
    for col in ("block", "pretrained %", "random-init %", f"CKA vs {sim['b']}"):
        t.add_column(col, justify="left" if col == "block" else "right")
    for i, r in enumerate(rows):
        diag = sim["cka"][i][i] if i < len(sim["cols"]) else None
        t.add_row(r["block"], f"{r['pretrained']:.2f}", f"{r['random_init']:.2f}",
                  "" if diag is None else f"{diag:.3f}")
    return t


def _figures(run_dir: Path, console: Console) -> list[Path]:
    """The run's figures (:func:`bigmodel.analysis.figures.make_all`); a figure that fails is
    reported in one line and does not cost the run its report."""
    from bigmodel.analysis import figures

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
        RecipeError: not a run directory, or no intact checkpoint.
    """
    from bigmodel.analysis import figures as figs

    console = console or Console()
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or not ((run_dir / "recipe.yaml").is_file() or (run_dir / "checkpoints").is_dir()):
        raise RecipeError(f"report {run_dir}: not a bigmodel run directory (no recipe.yaml or checkpoints/)")
    model, found, _ = figs.load_objective(run_dir)
    facts = {"backbone_params": model.backbone.num_params(), "total_params": sum(p.numel() for p in model.parameters())}
    steps = checkpoint.load_meta(found)["step"]
    del model
    if figures:
        written = _figures(run_dir, console)
        console.print(f"figures: {len(written)} under {run_dir / 'figures'}", highlight=False)
    json_path, html_path = run_report.rebuild(run_dir, model=facts, steps_done=steps)
    console.print(f"report: {json_path}  {html_path}", highlight=False)
    return json_path, html_path
