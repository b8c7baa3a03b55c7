"""Registry-wide checks, parametrized over every registered component."""

from __future__ import annotations

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
