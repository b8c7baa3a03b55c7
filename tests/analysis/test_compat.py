"""Registry-wide: every architecture × objective pair the capability matrix allows runs a
forward/backward step at tiny size; every pair it refuses is refused by recipe validation,
naming what is missing."""

from __future__ import annotations

import pytest
import torch

from bigmodel.analysis.compat import matrix
from bigmodel.data.base import TensorImages
from bigmodel.recipe import RecipeError, validate
from bigmodel.registry import ARCHITECTURES, OBJECTIVES

# Tiny settings per architecture (16 px grey inputs); an architecture not listed runs at defaults.
TINY_ARCH = {
    "resnet": {"depth": 18, "width": 0.125, "image_size": 16, "in_chans": 1},
    "vit": {"size": "nano", "image_size": 16, "patch_size": 4, "in_chans": 1},
    "timm": {"model": "deit_tiny_patch16_224", "image_size": 16, "in_chans": 1,
             "model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}},
}
PAIRS = [(a, o) for a, row in matrix().items() for o in row]
# Backbone parameters a step leaves without gradient, by design: iGPT's features are the middle
# block's (as in iGPT), so for any objective but next-pixel prediction the blocks above it and the
# final norm of the tiny (4-block) model are unused.
IGPT_ABOVE_FEATURES = ("blocks.2.", "blocks.3.", "norm.")
NO_GRAD = {("igpt", "simclr"): IGPT_ABOVE_FEATURES, ("igpt", "supervised"): IGPT_ABOVE_FEATURES,
           ("igpt", "byol"): IGPT_ABOVE_FEATURES}


def zero_branches(net: torch.nn.Module) -> list[str]:
    """Parameters of ResNet residual branches whose last conv starts at zero (``zero_init_last``):
    such a block is its shortcut, so nothing before that conv gets a gradient on the first step —
    conv1, norm2, and norm1 unless it also feeds the block's downsample shortcut (pre-activation)."""
    params = dict(net.named_parameters())
    dead = []
    for name, weight in params.items():
        if name.endswith(".conv2.weight") and ".blocks." in name and not weight.any():
            block = name.removesuffix("conv2.weight")
            parts = ["conv1.weight", "norm2.weight", "norm2.bias"]
            if not any(n.startswith(block + "downsample.") for n in params):
                parts += ["norm1.weight", "norm1.bias"]
            dead += [block + p for p in parts]
    return dead


@pytest.mark.parametrize("arch,obj", PAIRS)
def test_pair_trains_a_step_or_is_refused(arch, obj):
    arch_cfg = TINY_ARCH.get(arch, {})
    # the matrix's default settings, except where capabilities depend on them (a timm model's tokens)
    missing = sorted(set(OBJECTIVES.get(obj).requires) - ARCHITECTURES.get(arch).capabilities(**arch_cfg))
    assert missing == matrix()[arch][obj] or arch == "timm"
    raw = {"architecture": {"name": arch, **arch_cfg}, "data": {"name": "digits"}, "objective": {"name": obj}}
    if missing:
        with pytest.raises(RecipeError, match=missing[0]):
            validate(raw)
        return
    validate(raw)
    torch.manual_seed(0)
    net = ARCHITECTURES.build(arch, **arch_cfg)
    cls = OBJECTIVES.get(obj)
    num_classes = 4 if cls.needs_labels else 0
    model = cls(backbone=net, num_classes=num_classes)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (8, net.in_chans, net.image_size, net.image_size), generator=g,
                           dtype=torch.uint8)
    labels = torch.arange(8) % 4 if cls.needs_labels else torch.full((8,), -1)
    model.setup(TensorImages(images, labels))
    out = model(model.views(images, g), labels)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    without_grad = [n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    dead = set(zero_branches(net))
    assert without_grad == [n for n in trainable if n.startswith(NO_GRAD.get((arch, obj), ())) or n in dead]
