"""Imports only point down (STYLE.md 18): every ``import bigmodel...`` in the package, at module
level or inside a function, goes to the importer's own layer or one below it, and no set of
modules imports itself round in a circle.

The layers, lowest first, are written down once, in :data:`LAYERS`. A module belongs to the layer
of the longest prefix that names it. An import counts its explicit target: ``from bigmodel.a import
b`` is ``bigmodel.a.b`` when that is a module, else ``bigmodel.a``; ``importlib.import_module`` of
a constant string counts too. A registry's lookup imports the module that defines a component by
a name computed at run time (STYLE.md 19): that is the point of a registry, not an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bigmodel"

# Lowest first. Within a layer modules may import each other (without a circle).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("errors, registry, recipe", ("bigmodel.errors", "bigmodel.registry", "bigmodel.recipe")),
    ("architectures, data", ("bigmodel.architectures", "bigmodel.data")),
    ("objectives, collectives", ("bigmodel.objectives", "bigmodel.collectives")),
    ("train", ("bigmodel.train",)),
    ("loader", ("bigmodel.loader",)),
    ("transfer", ("bigmodel.transfer",)),
    ("analysis", ("bigmodel.analysis",)),
    ("commands, api", ("bigmodel.commands", "bigmodel.api", "bigmodel.export", "bigmodel.predict")),
    ("cli", ("bigmodel.cli", "bigmodel.__main__", "bigmodel")),
]

# The package's root is its public face (top layer, PEP 562 lazy names). Its dunders (``__version__``,
# ``__file__``) need no import of anything above, so reading them is allowed from any layer.


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the package (``pkg`` for ``pkg/__init__.py``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def layer_of(module: str) -> int | None:
    best, found = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            inside = module == p or (module.startswith(p + ".") and p != "bigmodel")  # the root: itself only
            if inside and len(p) > best:
                best, found = len(p), i
    return found


def imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[int, str, set[str]]]:
    """``(line, target module, names imported from it)`` for every import of a package module."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    found = []
    root_uses = {n.attr for n in ast.walk(tree)
                 if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "bigmodel"}

    def target(dotted: str) -> str | None:  # the module a dotted name resolves to, if in the package
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bigmodel":
                    names = root_uses if alias.name == "bigmodel" and alias.asname is None else set()
                    found.append((node.lineno, target(alias.name), names))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = module.split(".") if is_package else module.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join([*here, base] if base else here)
            if base.split(".")[0] != "bigmodel":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in known else target(base), {alias.name}))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and node.args[0].value.split(".")[0] == "bigmodel"):
            found.append((node.lineno, target(node.args[0].value), set()))
    return [(line, t, names) for line, t, names in found if t is not None and t != module
            and not (t == "bigmodel" and names and all(n.startswith("__") and n.endswith("__") for n in names))]


def graph(root: Path = PACKAGE) -> tuple[dict[str, Path], dict[str, list[tuple[int, str, set[str]]]]]:
    known = modules(root)
    return known, {m: imports(m, p, known) for m, p in known.items()}


def upward(root: Path = PACKAGE) -> list[str]:
    """One line per import against :data:`LAYERS`, and per module no layer holds."""
    known, edges = graph(root)
    bad = [f"{known[m].relative_to(root.parent)}: in no layer of tests/test_layers.py LAYERS" for m in known
           if layer_of(m) is None]
    for m, targets in edges.items():
        here = layer_of(m)
        for line, t, _ in targets:
            there = layer_of(t)
            if here is None or there is None or there > here:
                where = "no layer" if there is None else f"layer {LAYERS[there][0]!r}"
                bad.append(f"{known[m].relative_to(root.parent)}:{line} imports {t} ({where}) from layer "
                           f"{LAYERS[here][0] if here is not None else None!r}")
    return bad


def cycles(root: Path = PACKAGE) -> list[list[str]]:
    """The package's import circles (strongly connected components of more than one module)."""
    _, edges = graph(root)
    succ = {m: sorted({t for _, t, _ in targets}) for m, targets in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in succ:
        if v not in index:
            visit(v)
    return out


def test_no_import_against_the_layers() -> None:
    bad = upward()
    assert not bad, "imports that point up (or modules outside LAYERS):\n" + "\n".join(bad)


def test_no_import_circle() -> None:
    found = cycles()
    assert not found, "import circles:\n" + "\n".join(", ".join(c) for c in found)


# The scan itself, on a small made-up package: what it must see and what it must not.


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "bigmodel"
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_scan_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "recipe.py": "def validate():\n    import bigmodel.train.build\n",
        "train/__init__.py": "",
        "train/build.py": "from ..recipe import validate\nfrom . import trainer\n",
        "train/trainer.py": "def f():\n    from bigmodel.transfer import linear\n",
        "transfer/__init__.py": "def __call__():\n    import importlib\n    importlib.import_module('bigmodel.api')\n",
        "transfer/linear.py": "from bigmodel import __version__\n",
        "transfer/knn.py": "import bigmodel\nv = bigmodel.__version__\n",
        "transfer/fewshot.py": "import bigmodel\nbigmodel.load('run')\n",
        "api.py": "",
    })
    assert upward(root) == [
        "bigmodel/recipe.py:2 imports bigmodel.train.build (layer 'train') from layer 'errors, registry, recipe'",
        "bigmodel/train/trainer.py:2 imports bigmodel.transfer.linear (layer 'transfer') from layer 'train'",
        "bigmodel/transfer/__init__.py:3 imports bigmodel.api (layer 'commands, api') from layer 'transfer'",
        "bigmodel/transfer/fewshot.py:1 imports bigmodel (layer 'cli') from layer 'transfer'",
    ]
    assert cycles(root) == [["bigmodel.recipe", "bigmodel.train.build"]]


def test_scan_places_every_module(tmp_path: Path) -> None:
    root = _package(tmp_path, {"__init__.py": "", "components.py": "import bigmodel.transfer\n",
                               "transfer/__init__.py": ""})
    assert upward(root) == [
        "bigmodel/components.py: in no layer of tests/test_layers.py LAYERS",
        "bigmodel/components.py:1 imports bigmodel.transfer (layer 'transfer') from layer None",
    ]


@pytest.mark.parametrize("module, layer", [("bigmodel.recipe", 0), ("bigmodel.data.loader", 1), ("bigmodel.loader", 4),
                                           ("bigmodel.commands.run", 7), ("bigmodel", 8),
                                           ("bigmodel.components", None)])
def test_layer_of_takes_the_longest_prefix(module: str, layer: int | None) -> None:
    assert layer_of(module) == layer


def test_api_is_a_facade() -> None:
    """``bigmodel/api.py`` only names what the command modules define (one name per command): it
    defines no function or class of its own, and ``bigmodel.run``/``load``/``transfer`` are its
    ``run``/``load``/``transfer``."""
    import bigmodel
    from bigmodel import api

    tree = ast.parse((PACKAGE / "api.py").read_text())
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)]
    assert defined == []
    assert (bigmodel.run, bigmodel.load, bigmodel.resolve_recipe) == (api.run, api.load, api.resolve_recipe)
    assert bigmodel.transfer.score.score is api.transfer
    assert sorted(api.__all__) == sorted(n for n in vars(api) if not n.startswith("_") and n != "annotations")


def test_no_module_over_400_lines() -> None:
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
