"""``bigmodel ensemble``: the backbones of several checkpoints fine-tuned on one task and scored as a
mean-probability ensemble against each member (the work is :mod:`bigmodel.transfer.ensemble`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console

from bigmodel import loader
from bigmodel.errors import RecipeError
from bigmodel.registry import PROTOCOLS
from bigmodel.transfer import ensemble as ens
from bigmodel.transfer import suites
from bigmodel.transfer.runner import provenance


def ensemble(ckpts: list[str | Path], task: str | dict[str, Any], sets: list[str] | tuple[str, ...] = (),
             console: Console | None = None, out: str | Path | None = None) -> dict[str, Any]:
    """Fine-tune each checkpoint's backbone on ``task`` (a dataset name, an ``.npz`` path or a task
    section) and score the mean-probability ensemble against each member; ``sets`` adjust the
    task (``task.KEY=VALUE``) and the finetune protocol (``KEY=VALUE``). Writes JSON to ``out``."""
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
        m = loader.pretraining(ckpt)
        members.append((str(ckpt), m.backbone))
        steps.append(m.step)
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
