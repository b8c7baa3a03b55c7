"""Registry-wide checks, parametrized over every registered component."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from bigmodel.registry import ARCHITECTURES, OBJECTIVES, PROTOCOLS, Registry

# The smallest settings of each architecture (the defaults are used for anything not listed).
TINY = {
    "vit": {"size": "nano", "image_size": 16, "patch_size": 4},
    "resnet": {"depth": 18, "width": 0.25, "image_size": 16},
    "lstm": {"image_size": 16, "patch_size": 4, "hidden": 32, "layers": 1},
    "timm": {"model": "deit_tiny_patch16_224", "image_size": 16,
             "model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}},
    "igpt": {"size": "tiny", "image_size": 8},
}


# What each does with a batch of 2 at those settings: forward_features' shape, feature_dim, capabilities.
EXPECTED = {
    "vit": ((2, 17, 96), 96, {"tokens"}),  # 4×4 patches + class token, nano width
    "resnet": ((2, 128, 2, 2), 128, set()),  # 512 · 0.25 channels at stride 8
    "lstm": ((2, 16, 64), 64, set()),  # 16 patches, bidirectional 2 × 32
    "timm": ((2, 17, 32), 32, {"tokens"}),  # a timm DeiT: 4×4 patches + class token, width 32
    "igpt": ((2, 64, 64), 64, {"causal"}),  # one token per pixel, tiny width
}


def test_every_architecture_has_expectations() -> None:
    assert sorted(EXPECTED) == ARCHITECTURES.names()


@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_backbone_interface(name: str) -> None:
    kwargs = TINY.get(name, {})
    net = ARCHITECTURES.build(name, **ARCHITECTURES.validate(name, kwargs))
    x = torch.randn(2, net.in_chans, net.image_size, net.image_size)
    feats = net.forward_features(x)
    shape, dim, capabilities = EXPECTED[name]
    assert (tuple(feats.shape), net.feature_dim) == (shape, dim)
    pooled = net.pool(feats)
    assert pooled.shape == (2, dim)
    assert torch.equal(net.eval()(x), net.pool(net.forward_features(x)))
    assert type(net).capabilities(**kwargs) == capabilities


@pytest.mark.parametrize("registry", [ARCHITECTURES, OBJECTIVES, PROTOCOLS], ids=lambda r: r.kind)
def test_every_entry_has_a_schema_and_docs(registry: Registry) -> None:
    for name in registry.names():
        registry.config_model(name)  # every signature turns into a validator
        assert registry.get(name).__doc__, f"{registry.kind} {name} has no docstring"


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(KeyError, match="valid: .*vit"):
        ARCHITECTURES.get("vitt")


def test_a_registry_imports_its_package_on_first_lookup(tmp_path, monkeypatch) -> None:
    """STYLE.md 19: nothing imports the components for their side effects; the first lookup does,
    every public module of the package once (``_private`` modules are not components)."""
    pkg = tmp_path / "fakecomponents"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "reg.py").write_text("from bigmodel.registry import Registry\n"
                                "R = Registry('thing', package='fakecomponents')\n")
    use = "from fakecomponents.reg import R\n\n"
    (pkg / "alpha.py").write_text(use + "@R.register('a')\nclass A:\n    'An a.'\n")
    (pkg / "beta.py").write_text(use + "@R.register('b')\ndef b(size: int = 2):\n    'A b.'\n")
    (pkg / "_private.py").write_text("raise RuntimeError('not a component module')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from fakecomponents.reg import R

    assert "fakecomponents.alpha" not in sys.modules
    assert "b" in R
    assert {"fakecomponents.alpha", "fakecomponents.beta"} <= set(sys.modules)
    assert R.names() == ["a", "b"] and R.build("b", size=3) is None and R.describe("b") == "size=2"
    for name in ("fakecomponents", "fakecomponents.reg", "fakecomponents.alpha", "fakecomponents.beta"):
        monkeypatch.delitem(sys.modules, name)


@pytest.mark.slow  # a fresh interpreter importing torch and every component (6 s); `make test-all`
def test_the_registries_fill_themselves_in_a_fresh_process() -> None:
    """Validating a recipe in a process that imported only the recipe module finds every component."""
    code = ("import sys; from bigmodel.recipe import resolve; r = resolve('simclr-vit', ['run.tiny=true']); "
            "from bigmodel.registry import ARCHITECTURES, OBJECTIVES, PROTOCOLS; "
            "print(r.objective.name, 'timm' in ARCHITECTURES, sorted(set(OBJECTIVES.names()) & {'mae', 'simclr'}), "
            "sorted(set(PROTOCOLS.names()) & {'fewshot', 'finetune', 'knn', 'linear'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "simclr True ['mae', 'simclr'] ['fewshot', 'finetune', 'knn', 'linear']"
