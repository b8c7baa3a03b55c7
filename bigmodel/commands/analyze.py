"""``bigmodel analyze``: a checkpoint's layer-wise transfer analysis on one task — the arguments
checked, the backbones loaded (:mod:`bigmodel.loader`), the task's splits and the backbone to
compare with built; the analysis itself is :func:`bigmodel.analysis.analyze.probe_and_compare`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bigmodel import loader
from bigmodel.analysis.analyze import probe_and_compare
from bigmodel.errors import CheckpointError, InputError, RecipeError
from bigmodel.registry import PROTOCOLS
from bigmodel.train import build
from bigmodel.transfer import suites
from bigmodel.transfer.runner import provenance


def analyze(run_dir: str | Path, task: str, limit: int | None = None, against: str | Path | None = None,
            console: Console | None = None, finetune: list[str] | None = None) -> dict[str, Any]:
    """Layer-wise transfer analysis of a checkpoint on ``task`` (a dataset name or an ``.npz`` path):
    a linear probe on every block of the pretrained backbone and of its random-init twin, and
    linear CKA between their layers on the task's test images: pretrained vs the twin, or vs the
    backbone of ``against`` (a run directory or checkpoint folder of the same architecture), or vs
    a copy of the backbone fine-tuned on the task's train split when ``finetune`` is given
    (``KEY=VALUE`` settings of the finetune protocol; ``[]`` for its defaults). ``limit`` keeps the
    first ``limit`` images of each split.

    Writes ``RUN/analysis/layerwise-<task>.json|png`` and ``RUN/analysis/cka-<a>-vs-<b>.json|png``;
    returns ``{"layerwise": ..., "cka": ..., "files": [...]}``.

    The twin is built without the pretraining data (an analysis needs the run directory only); data-
    dependent state fitted before training (ImageGPT's and the causal LSTM's colour palette) is
    copied from the checkpoint, which holds exactly what the objective's setup fitted.
    """
    console = console or Console()
    if limit is not None and limit < 2:
        raise RecipeError(f"--limit {limit}: must be at least 2 images per split")
    m = loader.pretraining(run_dir)
    net, found, recipe = m.backbone, m.checkpoint, m.recipe
    other = None
    if against is not None and finetune is not None:
        raise RecipeError("give --against or --finetune, not both")
    if against is not None:
        try:
            other, found_b, recipe_b = loader.load_backbone(against)
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
        kind = type(e) if isinstance(e, InputError) else RecipeError  # a data error stays one
        raise kind(f"--task {task}: {str(e).splitlines()[0]}") from e
    if limit is not None:
        train, test = (d.subset(torch.arange(min(limit, len(d)))) for d in (train, test))
    finetuned = None
    if finetune is not None:
        finetuned = _finetuned_copy(net, entry, finetune, train, test, console)
        other = finetuned.pop("backbone")
    twin = build.random_twin(recipe, pretrained=net).to(next(net.parameters()).device)
    dev = build.device(recipe.run)
    dtype = build.autocast_dtype(recipe.run, dev)
    console.print(f"[bold]bigmodel analyze[/] {found} on {name} ({len(train)} train / {len(test)} test images)",
                  highlight=False)
    prov = provenance(found, m.step, dtype, str(dev), task=name, train_images=len(train), test_images=len(test))
    if other is None:
        label, source = "random_init", {}
    elif finetuned is not None:
        label, source = "finetuned", {"finetune": finetuned}
    else:
        label, source = re.sub(r"[^A-Za-z0-9_.-]+", "_", loader.run_dir_of(found_b).name), {"against": str(found_b)}
    title = (f"{recipe.architecture.name} × {recipe.objective.name}: linear probe per block, {name} "
             f"({len(train)} train / {len(test)} test)")
    return probe_and_compare(net, twin, train, test, task=name, title=title, out=loader.run_dir_of(found) / "analysis",
                             provenance=prov, batch_size=recipe.run.eval_batch_size, dtype=dtype, console=console,
                             other=None if other is None else other.to(dev), other_label=label, source=source)


def _finetuned_copy(net: Any, entry: dict[str, Any], sets: list[str], train: Any, test: Any,
                    console: Console) -> dict[str, Any]:
    """Fine-tune a copy of ``net`` on ``train`` with the finetune protocol (``KEY=VALUE`` settings);
    returns its settings, schedule, test top-1 and the fine-tuned ``backbone``."""
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
