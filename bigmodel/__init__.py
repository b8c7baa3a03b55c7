"""bigmodel: architecture × dataset × objective, pretrained once, transferred and analysed.

Scripting (the functions the CLI commands are built on, see :mod:`bigmodel.api`)::

    import bigmodel

    r = bigmodel.run("quickstart", {"run.tiny": True, "run.out": "runs/qs-tiny"})
    r.run_dir, r.top1("digits", "knn"), r.report["model"]["backbone_params"]
    m = bigmodel.load(r.run_dir)            # .backbone (eval), .objective, .recipe, .classes
    feats = m.features(images_uint8)       # = m.backbone(m.preprocess(images_uint8))
    row = bigmodel.transfer(r.run_dir, task="digits", protocol="knn", k=20)
    row["results"]["pretrained"]["top1"]

``import bigmodel`` stays light: the API (torch, timm, ...) is imported on first use.
"""

from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

__all__ = ["Pretrained", "Recipe", "RecipeError", "Result", "load", "resolve_recipe", "run", "transfer",
           "__version__"]

# public name -> (module, attribute), imported on first access (PEP 562)
_LAZY = {
    "run": ("bigmodel.api", "run_recipe"),
    "load": ("bigmodel.api", "load"),
    "resolve_recipe": ("bigmodel.api", "resolve_recipe"),
    "Result": ("bigmodel.api", "Result"),
    "Pretrained": ("bigmodel.api", "Pretrained"),
    "Recipe": ("bigmodel.recipe", "Recipe"),
    "RecipeError": ("bigmodel.recipe", "RecipeError"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name == "transfer":  # the subpackage, made callable by _Package.__setattr__ as it is imported
        return importlib.import_module("bigmodel.transfer")
    raise AttributeError(f"module 'bigmodel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _CallableTransfer(types.ModuleType):
    """``bigmodel.transfer`` is the subpackage of transfer protocols, and, called, the scripting
    function :func:`bigmodel.api.transfer_task`. A plain function of that name would be replaced by
    the subpackage as soon as anything imports ``bigmodel.transfer.*`` (Python sets the parent's
    attribute), so the subpackage itself is made callable."""

    def __call__(self, subject: object, task: object, protocol: str, **settings: object) -> dict:
        from bigmodel.api import transfer_task

        return transfer_task(subject, task, protocol, **settings)


class _Package(types.ModuleType):
    """The ``bigmodel`` package module: when the import system sets its ``transfer`` attribute to
    the freshly imported subpackage, that subpackage becomes a :class:`_CallableTransfer`."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "transfer" and type(value) is types.ModuleType:
            value.__class__ = _CallableTransfer
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
