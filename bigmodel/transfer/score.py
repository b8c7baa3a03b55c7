"""Scoring one subject on transfer tasks: what ``bigmodel.transfer(...)`` and ``bigmodel transfer``
do (the package itself is that callable, see :mod:`bigmodel.transfer`).

A subject is a run directory or checkpoint folder (rebuilt by :func:`bigmodel.loader.load`, scored
with its recipe's precision and batch size, the rows saved under ``RUN/transfer/``), a loaded
:class:`~bigmodel.loader.Pretrained`, or any backbone module. The entries come from a named suite
(:mod:`bigmodel.transfer.suites`), the run's own recipe, or one ``task`` × ``protocol``; the rows
are scored by :func:`bigmodel.transfer.runner.run_suite`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from bigmodel.architectures.base import Backbone
from bigmodel.errors import RecipeError
from bigmodel.loader import Pretrained, load_backbone, run_dir_of
from bigmodel.recipe import RunConfig, TransferSpec
from bigmodel.train import build, checkpoint
from bigmodel.transfer import suites
from bigmodel.transfer.runner import provenance, run_suite, table, write_report


def score(subject: str | Path | Pretrained | Backbone, task: str | dict[str, Any], protocol: str, *,
          quiet: bool = False, console: Console | None = None, **settings: Any) -> dict[str, Any]:
    """``bigmodel.transfer``: score one task with one protocol and return its row (``results``
    ``{"pretrained": {"top1": ..., ...}}``, the settings, ``n_train``/``n_test``).

    Args:
        subject: a run directory or checkpoint folder (scored as ``bigmodel transfer --task
            --protocol`` scores it, its precision and batch size, the row also saved under
            ``RUN/transfer/``), a :class:`~bigmodel.loader.Pretrained` (its recipe's precision and
            batch size, nothing written), or any backbone module (float32, nothing written).
        task: a dataset name, an ``.npz`` path, or a task section ``{"name": "npz", "path": ...}``.
        protocol: ``linear``, ``knn``, ``fewshot`` or ``finetune``; ``settings`` are its keys
            (``k=20``, ``shots=[1, 5]``), validated like a recipe's transfer entry.

    Raises:
        RecipeError: an unknown task, protocol or setting, or one the task cannot serve.
        CheckpointError: no intact checkpoint at a ``subject`` path.
    """
    entry = {"task": suites.task_entry(task) if isinstance(task, str) else dict(task), "protocol": protocol,
             **settings}
    console = console or Console(quiet=quiet)
    if isinstance(subject, str | Path):
        return score_checkpoint(subject, [entry], console)[0]
    specs = suites.specs([entry])
    suites.check(specs)
    net = subject.backbone if isinstance(subject, Pretrained) else subject
    dev = next(net.parameters()).device
    run_cfg = subject.recipe.run if isinstance(subject, Pretrained) and subject.recipe else None
    dtype = build.autocast_dtype(run_cfg, dev) if run_cfg else None
    batch_size = run_cfg.eval_batch_size if run_cfg else RunConfig().eval_batch_size
    return run_suite(specs, {"pretrained": net}, batch_size, dtype, console)[0]


def score_checkpoint(ckpt: str | Path, specs: list[TransferSpec] | list[dict[str, Any]] | None = None,
                     console: Console | None = None, *, suite: str | None = None,
                     sets: list[str] | tuple[str, ...] = (), name: str | None = None) -> list[dict[str, Any]]:
    """``bigmodel transfer``: score a checkpoint (a run directory or a checkpoint folder) on
    transfer specs: ``specs`` (validated specs or raw ``{task, protocol, ...}`` entries), else the
    suite ``suite`` (a built-in name or a YAML file), else its recipe's transfer section; ``sets``
    are ``KEY=VALUE`` adjustments (see :mod:`bigmodel.transfer.suites`). Settings a task cannot
    serve are refused before any work (:func:`bigmodel.transfer.suites.check`).

    Writes the rows with their provenance to ``RUN_DIR/transfer/<what>-<id>.json``, where ``what``
    is the suite's name, ``recipe``, ``<task>-<protocol>`` for one entry or ``custom``, and ``id``
    a hash of the full settings (:func:`~bigmodel.transfer.suites.settings_id`), so that runs with
    other settings keep their own files; ``name`` names the file exactly instead. Returns the rows.
    """
    console = console or Console()
    net, found, recipe = load_backbone(ckpt)
    what = "transfer"
    if specs is None:
        entries = suites.load_suite(suite) if suite else (recipe.raw.get("transfer") or [])
        what = Path(suite).stem if suite else "recipe"
        specs = suites.specs(entries, sets)
    elif all(isinstance(s, dict) for s in specs):
        what = f"{suites.entry_name(specs[0])}-{specs[0]['protocol']}" if len(specs) == 1 else "custom"
        specs = suites.specs(specs, sets)
    elif sets:
        raise ValueError("sets apply to raw entries or suites, not to validated specs")
    if not specs:
        raise RecipeError(f"{ckpt}: no transfer entries to score; give --suite NAME or --task and --protocol")
    suites.check(specs)
    name = name or f"{what}-{suites.settings_id(specs)}"
    path = run_dir_of(found) / "transfer" / f"{name}.json"
    step = checkpoint.load_meta(found)["step"]
    console.print(f"[bold]bigmodel transfer[/] {found} (step {step}): {len(specs)} entries → {path}")
    dev = build.device(recipe.run)
    dtype = build.autocast_dtype(recipe.run, dev)
    rows = run_suite(specs, {"pretrained": net}, recipe.run.eval_batch_size, dtype, console)
    console.print(table(rows))
    prov = provenance(found, step, dtype, str(dev), suite=what, sets=list(sets),
                      architecture=recipe.raw["architecture"])
    write_report(path, rows, prov)
    console.print(f"transfer report: {path}")
    return rows
