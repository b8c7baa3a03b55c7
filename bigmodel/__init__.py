"""bigmodel: architecture × dataset × objective, pretrained once, transferred and analysed.

Scripting (the API the CLI commands are built on, one name per command: :mod:`bigmodel.api`)::

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

__version__ = "0.1.0"

__all__ = ["Pretrained", "Recipe", "RecipeError", "Result", "load", "resolve_recipe", "run", "transfer",
           "__version__"]

# public name -> (module, attribute), imported on first access (PEP 562)
_LAZY = {
    "run": ("bigmodel.api", "run"),
    "load": ("bigmodel.loader", "load"),
    "resolve_recipe": ("bigmodel.api", "resolve_recipe"),
    "Result": ("bigmodel.api", "Result"),
    "Pretrained": ("bigmodel.loader", "Pretrained"),
    "Recipe": ("bigmodel.recipe", "Recipe"),
    "RecipeError": ("bigmodel.errors", "RecipeError"),
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name == "transfer":  # the subpackage of protocols, callable (see bigmodel/transfer/__init__.py)
        return importlib.import_module("bigmodel.transfer")
    raise AttributeError(f"module 'bigmodel' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
