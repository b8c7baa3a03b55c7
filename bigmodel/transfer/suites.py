"""Named transfer suites: lists of (task, protocol) entries kept as data in ``bigmodel/suites/*.yaml``.

A suite file has the shape of a recipe's ``transfer`` section (``transfer: [{task, protocol, ...}]``)
and opens with its command line. Task paths name ``$BIGMODEL_DATA/<file>``, kept as written and
found in the data folders when the task is built (:func:`bigmodel.data.base.expand_path`), so a
missing file says which ``bigmodel data get`` command writes it; ``$BIGMODEL_SHARED_DATA`` (the
pre-filled folder) and other variables are expanded on loading. ``--set KEY=VALUE`` adjusts the
entries before validation:

- ``KEY`` is a protocol key (``steps=50``) or ``task.KEY`` (``task.limit=500``);
- without an index it applies to every entry whose protocol (or task) accepts the key, and it is an
  error when none does; ``I.KEY`` applies it to entry ``I`` only (``3.schedule_scale=0.1``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import string
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bigmodel.data import base as data_base
from bigmodel.recipe import RecipeError, TransferSpec, parse_override, transfer_entry
from bigmodel.registry import DATASETS, PROTOCOLS

SHARED_DATA_VAR = data_base.SHARED_DATA_VAR


def shared_data() -> Path:
    """``$BIGMODEL_SHARED_DATA``, else ``shared/data`` beside the repository holding the package
    (one rule for suites and recipes: :func:`bigmodel.data.base.shared_data`)."""
    return data_base.shared_data()


def suite_names() -> list[str]:
    folder = resources.files("bigmodel") / "suites"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_suite(source: str | Path) -> list[dict[str, Any]]:
    """The raw entries of a built-in suite name or a suite YAML file, variables expanded."""
    source = str(source)
    if source in suite_names():
        text = (resources.files("bigmodel") / "suites" / f"{source}.yaml").read_text()
    elif Path(source).is_file():
        text = Path(source).read_text()
    else:
        raise RecipeError(f"suite {source!r}: neither a file nor a built-in suite; "
                          f"built-in: {', '.join(suite_names())}")
    raw = yaml.safe_load(text) or {}
    entries = raw.get("transfer") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"suite {source!r}: expected a non-empty 'transfer:' list of {{task, protocol, ...}}")
    env = {k: v for k, v in os.environ.items() if k != data_base.DATA_VAR}  # $BIGMODEL_DATA: resolved when built
    return _expand(entries, {**env, SHARED_DATA_VAR: str(shared_data())})


def _expand(node: Any, env: dict[str, str]) -> Any:
    if isinstance(node, str):
        return string.Template(node).safe_substitute(env)
    if isinstance(node, list):
        return [_expand(v, env) for v in node]
    if isinstance(node, dict):
        return {k: _expand(v, env) for k, v in node.items()}
    return node


def task_entry(task: str) -> dict[str, Any]:
    """A ``--task`` argument as a task section: a dataset name, or a path to an ``.npz`` file."""
    if task.endswith(".npz"):
        return {"name": "npz", "path": task}
    return {"name": task}


def entry_name(entry: dict[str, Any]) -> str:
    """A short name for an entry's task: the dataset name, or the stem of its file."""
    task = entry["task"]
    return task_name(task) if isinstance(task, str) else task_name(task.get("name"), task)


def task_name(name: Any, kwargs: dict[str, Any] | None = None) -> str:
    """A task's short name: the stem of its file (``path``), else the dataset name."""
    kwargs = kwargs or {}
    return Path(str(kwargs["path"])).stem if kwargs.get("path") else str(name)


def task_splits(task: Any) -> tuple[Any, Any]:
    """The materialised ``(train, test)`` splits of a validated task component."""
    return tuple(data_base.materialize(DATASETS.build(task.name, split=s, **task.kwargs)) for s in ("train", "test"))


def apply_sets(entries: list[dict[str, Any]], sets: list[str] | tuple[str, ...]) -> list[dict[str, Any]]:
    """``entries`` with the ``KEY=VALUE`` settings applied (see the module docstring)."""
    entries = copy.deepcopy(entries)
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "task" not in e or "protocol" not in e:
            raise RecipeError(f"transfer.{i}: needs task and protocol, e.g. {{task: digits, protocol: linear}}")
        e["task"] = {"name": e["task"]} if isinstance(e["task"], str) else dict(e["task"])
    for arg in sets:
        path, value = parse_override(arg)
        index = int(path.pop(0)) if path and path[0].isdigit() else None
        on_task = bool(path) and path[0] == "task"
        key = path[1:] if on_task else path
        if len(key) != 1 or not key[0]:
            raise RecipeError(f"--set {arg}: expected KEY=VALUE, task.KEY=VALUE or INDEX.KEY=VALUE")
        key = key[0]
        if index is not None:
            if index >= len(entries):
                raise RecipeError(f"--set {arg}: index must be 0..{len(entries) - 1}")
            targets = [entries[index]]
        else:
            targets = [e for e in entries if _accepts(e, key, on_task)]
            if not targets:
                raise RecipeError(f"--set {arg}: no {'task' if on_task else 'protocol'} of these entries "
                                  f"has a key {key!r}")
        for e in targets:
            (e["task"] if on_task else e)[key] = value
    return entries


def _accepts(entry: dict[str, Any], key: str, on_task: bool) -> bool:
    registry, name = (DATASETS, entry["task"].get("name")) if on_task else (PROTOCOLS, entry.get("protocol"))
    return isinstance(name, str) and name in registry and key in registry.config_model(name).model_fields


def specs(entries: list[dict[str, Any]], sets: list[str] | tuple[str, ...] = ()) -> list[TransferSpec]:
    """Validated transfer specs of raw entries (after ``sets``); problems raise :class:`RecipeError`."""
    return [transfer_entry(f"transfer.{i}", e) for i, e in enumerate(apply_sets(entries, sets))]


def check(specs: list[TransferSpec]) -> None:
    """Refuse, before anything runs, a spec whose protocol cannot serve its task (kNN's ``k`` above
    the training images, few-shot ``shots`` above a class's images, a task with one class): raises
    :class:`RecipeError` naming the entry, the setting, its value and the limit."""
    labels: dict[str, Any] = {}
    for i, spec in enumerate(specs):
        key = repr((spec.task.name, sorted(spec.task.kwargs.items())))
        if key not in labels:
            data = DATASETS.build(spec.task.name, split="train", **spec.task.kwargs)
            labels[key] = data.targets if hasattr(data, "targets") else data_base.materialize(data).targets
        try:
            PROTOCOLS.build(spec.protocol.name, **spec.protocol.kwargs).check(labels[key])
        except ValueError as e:
            raise RecipeError(f"transfer.{i} ({task_name(spec.task.name, spec.task.kwargs)} · "
                              f"{spec.protocol.name}): {e}") from None


def settings_id(specs: list[TransferSpec]) -> str:
    """A short stable hash of the specs' full settings (defaults included), e.g. ``3f2a9c``: two
    transfers with different settings get different report files, the same settings the same one."""
    full = [[s.task.name, DATASETS.config_model(s.task.name)(**s.task.kwargs).model_dump(),
             s.protocol.name, PROTOCOLS.config_model(s.protocol.name)(**s.protocol.kwargs).model_dump()]
            for s in specs]
    return hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:6]
