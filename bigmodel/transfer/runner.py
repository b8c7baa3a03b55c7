"""Runs a transfer suite: (task, protocol) pairs scored for several subjects — the pretrained
backbone, its randomly initialised twin and raw pixels — with the settings behind every number.
(What a suite holds, and the named suites, are :mod:`bigmodel.transfer.suites`.)

Evaluation provenance: each row carries the task and its settings, the protocol and its settings,
n_train/n_test, and per subject the result (with whatever the protocol chose for the task, e.g. the
fine-tuning schedule); :func:`provenance` adds the checkpoint, its step, the precision and the
library versions, and :func:`write_report` stores all of it as JSON.
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bigmodel import __version__
from bigmodel.architectures.base import Backbone
from bigmodel.recipe import TransferSpec
from bigmodel.registry import PROTOCOLS
from bigmodel.transfer import base, suites

PIXELS = "pixels"


def spec_key(spec: TransferSpec) -> str:
    """What identifies a row across runs: task and protocol, each with its settings."""
    return json.dumps([spec.task.name, spec.task.kwargs, spec.protocol.name, spec.protocol.kwargs],
                      sort_keys=True, default=str)


def run_suite(specs: list[TransferSpec], subjects: dict[str, Backbone | None], batch_size: int = 256,
              dtype: torch.dtype | None = None, console: Console | None = None, *,
              done: dict[str, dict[str, Any]] | None = None,
              on_row: Callable[[str, dict[str, Any]], None] | None = None,
              stop: Any = None) -> list[dict[str, Any]]:
    """Score every spec for every subject (``None`` = raw pixels). Returns one row per spec.

    Args:
        done: rows already scored, by :func:`spec_key`: taken as they are, not recomputed.
        on_row: called with ``(key, row)`` after each row is scored (to save it at once).
        stop: anything with a ``requested`` flag (:class:`~bigmodel.train.signals.GracefulStop`):
            once set, the suite ends after the row in progress and returns the rows so far, fewer
            than ``specs``.
    """
    console = console or Console()
    done = done or {}
    splits: dict[str, tuple] = {}
    feats: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    rows = []
    for spec in specs:
        row_key = spec_key(spec)
        if row_key in done:
            rows.append(done[row_key])
            continue
        if stop is not None and stop.requested:
            break
        task_key = repr((spec.task.name, sorted(spec.task.kwargs.items())))
        if task_key not in splits:
            splits[task_key] = suites.task_splits(spec.task)
        train, test = splits[task_key]
        protocol = PROTOCOLS.build(spec.protocol.name, **spec.protocol.kwargs)
        row = {"task": spec.task.name, "task_settings": spec.task.kwargs, "protocol": spec.protocol.name,
               "settings": protocol.settings(), "n_train": len(train), "n_test": len(test), "results": {}}
        console.print(f"transfer {len(rows) + 1}/{len(specs)}: {task_label(row)} · {protocol_label(row)} "
                      f"({len(train)} train / {len(test)} test images)", highlight=False)
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
                        feats[key] = tuple(base.features(net, split, batch_size, dtype, console,
                                                         f"  features {task_label(row)}/{name} · {subject}")
                                           for name, split in (("train", train), ("test", test)))
                t0 = time.perf_counter()
                res = protocol.fit_score(feats[key][0], train.targets, feats[key][1], test.targets)
            res["seconds"] = round(time.perf_counter() - t0, 2)
            row["results"][subject] = res
            console.print(f"  {task_label(row)} · {protocol_label(row)} · {subject}: top-1 {cell(res)}%",
                          highlight=False)
        rows.append(row)
        if on_row is not None:
            on_row(row_key, row)
    return rows


def versions() -> dict[str, str]:
    """Versions of Python, bigmodel and the libraries a number depends on."""
    out = {"python": platform.python_version(), "bigmodel": __version__}
    for dist in ("torch", "torchvision", "timm", "scikit-learn", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def provenance(checkpoint: str | Path | None = None, step: int | None = None,
               dtype: torch.dtype | None = None, device: str | None = None, **extra: Any) -> dict[str, Any]:
    """What a transfer table was computed from, beyond the rows' own settings."""
    return {"checkpoint": None if checkpoint is None else str(checkpoint), "step": step,
            "feature_precision": str(dtype or torch.float32).replace("torch.", ""), "device": device,
            "versions": versions(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **extra}


def write_report(path: Path, rows: list[dict[str, Any]], prov: dict[str, Any]) -> Path:
    """Write ``{"provenance": ..., "transfer": rows}`` atomically to ``path`` (JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"provenance": prov, "transfer": rows}, indent=1, default=str))
    tmp.replace(path)
    return path


def read_partial(path: Path, step: int | None) -> dict[str, dict[str, Any]]:
    """Rows a stopped suite saved to ``path`` (see :func:`write_partial`), by :func:`spec_key`;
    empty when there is no readable file or its rows were scored at another checkpoint step."""
    try:
        saved = json.loads(Path(path).read_text())
        if saved["provenance"]["step"] != step:
            return {}
        return dict(zip(saved["keys"], saved["transfer"], strict=True))
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def write_partial(path: Path, done: dict[str, dict[str, Any]], prov: dict[str, Any]) -> Path:
    """Write the rows scored so far with their keys (atomically), so that a stopped suite resumes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"provenance": prov, "keys": list(done), "transfer": list(done.values())},
                              indent=1, default=str))
    tmp.replace(path)
    return path


def table(rows: list[dict[str, Any]], title: str = "transfer (top-1 %, test split)") -> Table:
    subjects = subjects_of(rows)
    t = Table(title=title)
    t.add_column("task")
    t.add_column("protocol")
    for s in subjects:
        t.add_column(s, justify="right")
    for task, protocol, cells in table_lines(rows):
        t.add_row(task, protocol, *(cells.get(s, "–") for s in subjects))
    return t


def subjects_of(rows: list[dict[str, Any]]) -> list[str]:
    """The subjects (columns) of a suite's rows, in the order they were scored."""
    return list(dict.fromkeys(s for r in rows for s in r["results"]))


def table_lines(rows: list[dict[str, Any]]) -> list[tuple[str, str, dict[str, str]]]:
    """``(task, protocol, {subject: cell})`` per table line: one per row, and one per shot count for
    few-shot rows (``fewshot 5-shot``: mean ± std over its seeds), so no number is hidden."""
    lines = []
    for r in rows:
        shots = sorted({int(k) for res in r["results"].values() for k in res.get("per_shot", {})})
        if r["protocol"] == "fewshot" and shots:
            for k in shots:
                cells = {}
                for subject, res in r["results"].items():
                    per = res["per_shot"].get(k, res["per_shot"].get(str(k)))  # str keys after JSON
                    cells[subject] = f"{per['mean']:.2f} ± {per['std']:.2f}"
                lines.append((task_label(r), f"fewshot {k}-shot", cells))
        else:
            lines.append((task_label(r), protocol_label(r), {s: cell(res) for s, res in r["results"].items()}))
    return lines


def cell(result: dict[str, Any]) -> str:
    """``top1`` as text, ``± std`` where the protocol reports one (few-shot over seeds)."""
    std = result.get("top1_std")
    return f"{result['top1']:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def task_label(row: dict[str, Any]) -> str:
    return suites.task_name(row["task"], row["task_settings"])


def protocol_label(row: dict[str, Any]) -> str:
    """The protocol, with the setting its top1 depends on most (few-shot: the primary shot count)."""
    if row["protocol"] == "fewshot":
        return f"fewshot ({row['settings']['primary']}-shot)"
    return row["protocol"]
