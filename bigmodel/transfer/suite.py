"""A transfer suite: (task, protocol) pairs scored for several subjects — the pretrained backbone,
its randomly initialised twin and raw pixels — with the settings behind every number."""

from __future__ import annotations

import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bigmodel.architectures.base import Backbone
from bigmodel.data.base import materialize
from bigmodel.recipe import TransferSpec
from bigmodel.registry import DATASETS, PROTOCOLS
from bigmodel.transfer import base

PIXELS = "pixels"


def run_suite(specs: list[TransferSpec], subjects: dict[str, Backbone | None], batch_size: int = 256,
              dtype: torch.dtype | None = None, console: Console | None = None) -> list[dict[str, Any]]:
    """Score every spec for every subject (``None`` = raw pixels). Returns one row per spec."""
    console = console or Console()
    splits: dict[str, tuple] = {}
    feats: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    rows = []
    for spec in specs:
        task_key = repr((spec.task.name, sorted(spec.task.kwargs.items())))
        if task_key not in splits:
            splits[task_key] = tuple(materialize(DATASETS.build(spec.task.name, split=s, **spec.task.kwargs))
                                     for s in ("train", "test"))
        train, test = splits[task_key]
        protocol = PROTOCOLS.build(spec.protocol.name, **spec.protocol.kwargs)
        row = {"task": spec.task.name, "task_settings": spec.task.kwargs, "protocol": spec.protocol.name,
               "settings": protocol.settings(), "n_train": len(train), "n_test": len(test), "results": {}}
        for subject, net in subjects.items():
            if not protocol.frozen:
                if net is None:
                    continue
                t0 = time.perf_counter()
                res = protocol.run(net, train, test)
            else:
                key = (task_key, subject)
                if key not in feats:
                    if net is None:
                        feats[key] = (base.pixels(train), base.pixels(test))
                    else:
                        feats[key] = (base.features(net, train, batch_size, dtype),
                                      base.features(net, test, batch_size, dtype))
                t0 = time.perf_counter()
                res = protocol.fit_score(feats[key][0], train.targets, feats[key][1], test.targets)
            res["seconds"] = round(time.perf_counter() - t0, 2)
            row["results"][subject] = res
            console.print(f"  {spec.task.name} · {spec.protocol.name} · {subject}: top-1 {res['top1']:.2f}%",
                          highlight=False)
        rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], title: str = "transfer (top-1 %, test split)") -> Table:
    subjects = list(dict.fromkeys(s for r in rows for s in r["results"]))
    t = Table(title=title)
    t.add_column("task")
    t.add_column("protocol")
    for s in subjects:
        t.add_column(s, justify="right")
    for r in rows:
        cells = [f"{r['results'][s]['top1']:.2f}" if s in r["results"] else "–" for s in subjects]
        t.add_row(r["task"], r["protocol"], *cells)
    return t
