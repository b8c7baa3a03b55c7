"""Recipes: YAML with sections ``architecture``, ``data``, ``objective``, ``optim``, ``run`` and
``transfer``, overridden by ``section.key=value`` arguments and validated before anything runs.

Component sections are ``{name, **kwargs}``; the kwargs are checked against the registered
builder's signature (see :mod:`bigmodel.registry`). Every problem becomes one
:class:`RecipeError` line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from bigmodel.errors import RecipeError  # noqa: F401  (re-exported: raised by validation)
from bigmodel.registry import ARCHITECTURES, DATASETS, OBJECTIVES, PROTOCOLS, Registry

SECTIONS = ("architecture", "data", "objective", "optim", "run", "transfer", "tiny")


class OptimConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # optim.lr=inf is a typo, not a setting

    name: Literal["adamw", "sgd"] = "adamw"
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.05
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.999)
    batch_size: Annotated[int, Field(ge=1)] = 128
    accum_steps: Annotated[int, Field(ge=1)] = 1
    steps: Annotated[int, Field(ge=1)] = 1000
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.0
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0

    @model_validator(mode="after")
    def _micro_batches_divide(self) -> OptimConfig:
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}")
        return self


class Component(BaseModel):
    """A validated ``{name, **kwargs}`` section."""

    name: str
    kwargs: dict[str, Any] = {}


class MonitorSpec(BaseModel):
    """``run.monitor``: a frozen-feature probe on a fixed task subset every ``every`` pretraining steps."""
    model_config = ConfigDict(extra="forbid")
    task: Component
    protocol: Component
    every: Annotated[int, Field(ge=1, strict=True)] = 200  # pretraining steps between evaluations
    limit: Annotated[int, Field(ge=1, strict=True)] | None = 1000  # images of each split (seeded subset); None: all


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    out: str = "runs/quickstart"
    seed: int = 0
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    deterministic: bool = False  # deterministic GPU kernels: a resumed run matches an unbroken one bit for bit
    checkpoint_every: Annotated[int, Field(ge=1)] = 200
    keep_checkpoints: Annotated[int, Field(ge=1)] = 2
    log_every: Annotated[int, Field(ge=1)] = 20
    num_workers: Annotated[int, Field(ge=0)] = 0
    tiny: bool = False
    eval_batch_size: Annotated[int, Field(ge=1)] = 256
    tensorboard: bool = False  # TensorBoard event files in RUN/tensorboard (extra: bigmodel[tensorboard])
    strategy: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: DDP, or FSDP2 (fully_shard) for big models
    compile: bool = False  # torch.compile the backbone
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    figures: bool = True  # draw RUN/figures (probe, t-SNE, ...) at the end; false skips that work (tests, sweeps)
    monitor: MonitorSpec | None = None  # {task, protocol, every, limit, **protocol keys}: see monitor_entry


class TransferSpec(BaseModel):
    task: Component
    protocol: Component


class Recipe(BaseModel):
    architecture: Component
    data: Component
    objective: Component
    optim: OptimConfig
    run: RunConfig
    transfer: list[TransferSpec]
    raw: dict[str, Any]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False)


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def zoo_names() -> list[str]:
    folder = resources.files("bigmodel") / "recipes"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def zoo_text(name: str) -> str:
    return (resources.files("bigmodel") / "recipes" / f"{name}.yaml").read_text()


def load_raw(source: str | Path | None) -> dict[str, Any]:
    """The YAML dict of a zoo name, a file path, or the quick-start recipe when ``None``."""
    source = "quickstart" if source is None else str(source)
    if source in zoo_names():
        text = zoo_text(source)
    elif Path(source).is_file():
        text = Path(source).read_text()
    else:
        raise RecipeError(
            f"recipe {source!r}: neither a file nor a zoo recipe; zoo: {', '.join(zoo_names())}"
        )
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe {source!r}: not valid YAML ({e})".replace("\n", " ")) from e
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {source!r}: top level must be a mapping of sections")
    return raw


def parse_override(arg: str) -> tuple[list[str], Any]:
    if "=" not in arg or arg.startswith("="):
        raise RecipeError(f"override {arg!r}: expected section.key=value, e.g. optim.lr=3e-4")
    key, value = arg.split("=", 1)
    return key.split("."), yaml.safe_load(value) if value else ""


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node: Any = raw
    for i, part in enumerate(path[:-1]):
        where = ".".join(path[: i + 1])
        if isinstance(node, list):
            node = node[_index(part, node, where)]
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, dict | list):
            raise RecipeError(f"override {'.'.join(path)}: {where} is a value, not a section")
    last = path[-1]
    if isinstance(node, list):
        node[_index(last, node, ".".join(path))] = value
    else:
        node[last] = value


def _index(part: str, seq: list, where: str) -> int:
    if not part.isdigit() or int(part) >= len(seq):
        raise RecipeError(f"override {where}: index must be 0..{len(seq) - 1}")
    return int(part)


def resolve(source: str | Path | None = None, overrides: list[str] = (),
            note: Callable[[str], None] | None = None) -> Recipe:
    """Load, override (CLI wins over ``tiny`` which wins over the file) and validate a recipe.

    An override that changes a component's name (``data.name=npz``, ``"data={name: npz, ...}"``,
    ``transfer.0.protocol=linear``, ``transfer.0.task=mnist``) starts that component from the new
    component's defaults: the file's keys for it are dropped, keys given on the command line still
    apply, and so are the ``tiny`` keys under it (they were written for the old component). Each
    section whose tiny keys were dropped gives one note, e.g. ``tiny keys data.classes dropped: data
    is now npz``, passed to ``note`` once the recipe is valid (default: printed to stderr as
    ``note: ...``; an invalid recipe prints only its error).
    """
    raw = load_raw(source)
    return resolve_raw(raw, [parse_override(o) for o in overrides], note)


def dotted_overrides(overrides: Mapping[str, Any]) -> list[tuple[list[str], Any]]:
    """A mapping of dotted keys to values (``{"optim.steps": 10}``), as :func:`parse_override`
    parses ``optim.steps=10``: ``(["optim", "steps"], 10)`` pairs. Values are taken as they are
    (copied), where the command line has them parsed as YAML."""
    pairs = []
    for key, value in overrides.items():
        if not isinstance(key, str) or not key or key.startswith("."):
            raise RecipeError(f"override {key!r}: expected a dotted section.key, e.g. optim.lr")
        pairs.append((key.split("."), copy.deepcopy(value)))
    return pairs


def resolve_raw(raw: dict[str, Any], parsed: list[tuple[list[str], Any]],
                note: Callable[[str], None] | None = None, *, apply_tiny: bool = True) -> Recipe:
    """:func:`resolve` of a recipe dict (not changed) and overrides already parsed into
    ``(path, value)`` pairs (:func:`parse_override`, :func:`dotted_overrides`).

    ``apply_tiny=False`` leaves the ``tiny`` keys unapplied, for a recipe resolved once already
    (:attr:`Recipe.raw`): its values hold the tiny keys and the overrides that won over them.
    """
    raw = copy.deepcopy(raw)
    overridden = copy.deepcopy(raw)
    for path, value in parsed:
        apply_override(overridden, path, value)
    new_names = _component_names(overridden)
    switched = {where: new_names[where] for where, name in _component_names(raw).items()
                if where in new_names and new_names[where] != name}
    for where in switched:
        _restart(raw, where)
    for path, value in parsed:
        apply_override(raw, path, value)
    dropped: dict[tuple[str, ...], list[str]] = {}
    if apply_tiny and (raw.get("run") or {}).get("tiny") is True:
        tiny = raw.get("tiny") or {}
        for key, value in list(tiny.items()):
            owner = _owner(str(key).split("."), switched)
            if owner is not None:
                dropped.setdefault(owner, []).append(str(key))
                del tiny[key]  # the saved recipe must resolve again as it ran
            else:
                apply_override(raw, str(key).split("."), value)
        for path, value in parsed:
            apply_override(raw, path, value)
    recipe = validate(raw)
    for where, keys in dropped.items():
        (note or _print_note)(f"tiny keys {', '.join(keys)} dropped: {_label(where)} is now {switched[where]}")
    return recipe


def _print_note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


# A component's place in a raw recipe: ("data",), ("transfer", "0") for entry 0's protocol (its
# keys sit beside ``task``), ("transfer", "0", "task") for its task (a name or a section).


def _component_names(raw: dict[str, Any]) -> dict[tuple[str, ...], Any]:
    """Every component of a raw recipe with its name."""
    out: dict[tuple[str, ...], Any] = {}
    for section in ("architecture", "data", "objective"):
        if isinstance(raw.get(section), dict):
            out[(section,)] = raw[section].get("name")
    entries = raw.get("transfer")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(entry, dict):
            out[("transfer", str(i))] = entry.get("protocol")
            task = entry.get("task")
            out[("transfer", str(i), "task")] = task.get("name") if isinstance(task, dict) else task
    return out


def _restart(raw: dict[str, Any], where: tuple[str, ...]) -> None:
    """Empty the component at ``where`` (an entry's protocol keeps its task)."""
    if len(where) == 1:
        raw[where[0]] = {}
    elif len(where) == 2:
        entry = raw["transfer"][int(where[1])]
        raw["transfer"][int(where[1])] = {"task": entry.get("task")}
    else:
        raw["transfer"][int(where[1])]["task"] = {}


def _owner(key: list[str], switched: dict[tuple[str, ...], Any]) -> tuple[str, ...] | None:
    """The switched component that a dotted key belongs to, if any."""
    for where in switched:
        inside = tuple(key[:len(where)]) == where
        if inside and not (len(where) == 2 and key[2:3] == ["task"]):
            return where
    return None


def _label(where: tuple[str, ...]) -> str:
    return ".".join(where) + (".protocol" if len(where) == 2 else "")


def validate(raw: dict[str, Any]) -> Recipe:
    raw = copy.deepcopy(raw)
    for key in raw:
        if key not in SECTIONS:
            raise RecipeError(f"{key}: unknown section; valid: {', '.join(SECTIONS)}")
    for key in ("architecture", "data", "objective"):
        if not isinstance(raw.get(key), dict):
            raise RecipeError(f"{key}: missing section; it needs at least a name")
    arch = component("architecture", raw["architecture"], ARCHITECTURES)
    data = component("data", raw["data"], DATASETS)
    obj = component("objective", raw["objective"], OBJECTIVES)
    optim = _model("optim", OptimConfig, raw.get("optim") or {})
    run_raw = raw.get("run") or {}
    run = _model("run", RunConfig, {**run_raw, "monitor": None} if isinstance(run_raw, dict) else run_raw)
    if run_raw.get("monitor") is not None:  # a component section: validated as transfer entries are
        run = run.model_copy(update={"monitor": monitor_entry("run.monitor", run_raw["monitor"])})
    transfer = []
    specs = raw.get("transfer") or []
    if not isinstance(specs, list):
        raise RecipeError("transfer: must be a list of {task, protocol, ...} entries")
    for i, spec in enumerate(specs):
        transfer.append(transfer_entry(f"transfer.{i}", spec))
    _check_compatible(arch, obj)
    return Recipe(architecture=arch, data=data, objective=obj, optim=optim, run=run, transfer=transfer, raw=raw)


def component(section: str, cfg: Any, registry: Registry) -> Component:
    """A ``{name, **kwargs}`` section validated against ``registry`` (``section`` names it in errors)."""
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise RecipeError(f"{section}: needs a name; valid: {', '.join(registry.names())}")
    kwargs = {k: v for k, v in cfg.items() if k != "name"}
    name = cfg["name"]
    if not isinstance(name, str) or name not in registry:
        raise RecipeError(
            f"{section}.name = {name!r}: unknown {registry.kind}; valid: {', '.join(registry.names())}"
        )
    try:
        kwargs = registry.validate(name, kwargs)
    except ValidationError as e:
        raise RecipeError(_one_line(section, e, registry.config_model(name))) from None
    return Component(name=name, kwargs=kwargs)


def _model(section: str, model: type[BaseModel], cfg: Any) -> Any:
    if not isinstance(cfg, dict):
        raise RecipeError(f"{section}: must be a mapping of keys")
    try:
        return model(**cfg)
    except ValidationError as e:
        raise RecipeError(_one_line(section, e, model)) from None


def transfer_entry(section: str, spec: Any) -> TransferSpec:
    """A ``{task, protocol, **protocol keys}`` entry validated into a :class:`TransferSpec`."""
    if not isinstance(spec, dict) or "task" not in spec or "protocol" not in spec:
        raise RecipeError(f"{section}: needs task and protocol, e.g. {{task: digits, protocol: linear}}")
    task = spec["task"]
    task = {"name": task} if isinstance(task, str) else task
    protocol = {"name": spec["protocol"], **{k: v for k, v in spec.items() if k not in ("task", "protocol")}}
    return TransferSpec(
        task=component(f"{section}.task", task, DATASETS),
        protocol=component(f"{section}.protocol", protocol, PROTOCOLS),
    )


def monitor_entry(section: str, spec: Any) -> MonitorSpec:
    """``run.monitor``: a transfer entry (a frozen-feature protocol) plus ``every`` and ``limit``."""
    if not isinstance(spec, dict) or "task" not in spec or "protocol" not in spec:
        raise RecipeError(f"{section}: needs task and protocol, e.g. {{task: digits, protocol: knn, every: 200}}")
    frozen, name = [n for n in PROTOCOLS.names() if getattr(PROTOCOLS.get(n), "frozen", False)], spec["protocol"]
    if not isinstance(name, str) or name not in frozen:
        what = "not a frozen-feature protocol" if isinstance(name, str) and name in PROTOCOLS else "unknown protocol"
        raise RecipeError(f"{section}.protocol = {name!r}: {what}; valid: {', '.join(frozen)}")
    own = {k: spec[k] for k in ("every", "limit") if k in spec}
    entry = transfer_entry(section, {k: v for k, v in spec.items() if k not in own})
    return _model(section, MonitorSpec, {"task": entry.task, "protocol": entry.protocol, **own})


def _check_compatible(arch: Component, obj: Component) -> None:
    backbone_cls = ARCHITECTURES.get(arch.name)
    objective_cls = OBJECTIVES.get(obj.name)
    have = set(getattr(backbone_cls, "capabilities", lambda **_: set())(**arch.kwargs))
    need = set(getattr(objective_cls, "requires", ()))
    missing = sorted(need - have)
    if missing:
        why = getattr(backbone_cls, "why_not", None)  # an architecture that can say why, e.g. timm
        reasons = [r for r in (why(m, **arch.kwargs) for m in missing) if r] if why else []
        raise RecipeError(
            f"objective {obj.name!r} cannot train architecture {arch.name!r}: it needs "
            f"{', '.join(missing)}, which {arch.name!r} lacks"
            f"{' with these settings' if arch.kwargs else ''}"
            + (f" ({'; '.join(reasons)})" if reasons else "")
        )


def _one_line(section: str, error: ValidationError, model: type[BaseModel]) -> str:
    err = error.errors()[0]
    key = ".".join([section, *(str(p) for p in err["loc"])])
    if err["type"] == "extra_forbidden":
        valid = ", ".join(_nested(model, err["loc"][:-1]).model_fields) or "none"
        return f"{key}: unknown key; valid keys: {valid}"
    if err["type"] == "missing":
        return f"{key}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a rule across keys of the section
        return f"{key}: {msg}"
    return f"{key} = {err.get('input')!r}: {msg[0].lower() + msg[1:]}"


def _nested(model: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The model of a nested mapping (e.g. ``architecture.moe``) that ``loc`` points into."""
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field is not None else None
        subs = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not subs:
            break
        model = subs[0]
    return model
