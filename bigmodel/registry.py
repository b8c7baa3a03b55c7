"""One small registry per component kind.

A registry maps a name to a builder (a class or function). The builder's signature *is* the
component's configuration schema: its keyword parameters, with their type hints, defaults and
``Annotated[..., Field(...)]`` constraints, become a pydantic model that validates the recipe
section before anything is built. Parameters listed in ``context`` are supplied by the framework
(for example the backbone an objective trains) and cannot be set from a recipe.

A registry fills itself (STYLE.md 19): it knows the package that holds its components, and the
first lookup (:meth:`Registry.get`, :meth:`~Registry.names`, ``in``) imports every module of that
package, whose decorators register what they define. Nothing imports "every component" for its
side effects, and a new component is one new file in its package.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, create_model


class Registry:
    """A name → builder table for one component kind (architecture, dataset, ...).

    Args:
        kind: what an entry is, for messages (``"architecture"``).
        package: the dotted package whose modules define the entries; its modules are imported on
            the first lookup. ``None``: entries are registered by whoever imports this registry.
        context: builder parameters the framework supplies (not recipe keys).
    """

    def __init__(self, kind: str, context: tuple[str, ...] = (), *, package: str | None = None):
        self.kind = kind
        self.context = frozenset(context)
        self.package = package
        self._filled = package is None
        self._entries: dict[str, Callable[..., Any]] = {}
        self._models: dict[str, type[BaseModel]] = {}

    def _fill(self) -> None:
        """Import every module of :attr:`package` (once), so that their decorators register."""
        if self._filled:
            return
        self._filled = True  # first: a module being imported may look an entry up
        try:
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")
        except BaseException:
            self._filled = False
            raise

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator: ``@ARCHITECTURES.register("vit")``."""

        def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = builder
            return builder

        return wrap

    def names(self) -> list[str]:
        self._fill()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._fill()
        return name in self._entries

    def get(self, name: str) -> Callable[..., Any]:
        self._fill()
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._entries[name]

    def config_model(self, name: str) -> type[BaseModel]:
        """The pydantic model of the recipe keys accepted by ``name`` (built once, cached)."""
        if name not in self._models:
            builder = self.get(name)
            target = builder.__init__ if inspect.isclass(builder) else builder
            hints = _type_hints(target)
            fields: dict[str, Any] = {}
            for p in inspect.signature(target).parameters.values():
                if p.name in ("self",) or p.name in self.context:
                    continue
                if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                    continue
                annotation = hints.get(p.name, Any)
                default = ... if p.default is p.empty else p.default
                fields[p.name] = (annotation, default)
            self._models[name] = create_model(
                f"{self.kind}_{name}".replace(":", "_").replace("-", "_"),
                __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
                **fields,
            )
        return self._models[name]

    def validate(self, name: str, cfg: dict[str, Any]) -> dict[str, Any]:
        """Validate recipe keys for ``name``; returns them with types coerced (pydantic errors)."""
        model = self.config_model(name)
        return model(**cfg).model_dump(exclude_unset=True)

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def describe(self, name: str) -> str:
        """``key=default`` list for ``bigmodel components``."""
        parts = []
        for key, field in self.config_model(name).model_fields.items():
            parts.append(key if field.is_required() else f"{key}={field.default!r}")
        return ", ".join(parts)


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn, include_extras=True)
    except Exception:  # unresolved forward references: fall back to no hints
        return {}


ARCHITECTURES = Registry("architecture", package="bigmodel.architectures")
DATASETS = Registry("dataset", context=("split",), package="bigmodel.data")
OBJECTIVES = Registry("objective", context=("backbone", "num_classes", "total_steps"), package="bigmodel.objectives")
PROTOCOLS = Registry("transfer protocol", context=("pretrained", "task"), package="bigmodel.transfer")
