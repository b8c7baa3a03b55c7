"""The architecture × objective pairs of the token families: each pair the capabilities allow
takes a forward/backward step at tiny size through the recipe builder; each one they refuse is
rejected by ``resolve``'s validation, naming the missing capability."""

from __future__ import annotations

import pytest
import torch

from bigmodel.recipe import RecipeError, validate
from bigmodel.train import build

ARCHS = {
    "vit": {"name": "vit", "size": "nano", "image_size": 8, "patch_size": 4, "in_chans": 1},
    "vit-moe": {"name": "vit", "size": "nano", "image_size": 8, "patch_size": 4, "in_chans": 1,
                "moe": {"experts": 2, "top_k": 1, "every": 1}},
    "lstm": {"name": "lstm", "image_size": 8, "patch_size": 4, "in_chans": 1, "hidden": 8, "layers": 1},
    "lstm-causal": {"name": "lstm", "image_size": 4, "patch_size": 1, "in_chans": 1, "hidden": 8, "layers": 1,
                    "causal": True, "colours": 4},
    "igpt": {"name": "igpt", "size": "tiny", "image_size": 4, "in_chans": 1, "colours": 4},
}
OBJECTIVES = {"supervised": {"name": "supervised", "crop_pad": 1},
              "mae": {"name": "mae", "decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
              "autoregressive": {"name": "autoregressive", "palette_images": 64}}
REFUSED = {  # pair → the capability named in the error
    ("lstm", "mae"): "tokens", ("lstm-causal", "mae"): "tokens", ("igpt", "mae"): "tokens",
    ("vit", "autoregressive"): "causal", ("vit-moe", "autoregressive"): "causal",
    ("lstm", "autoregressive"): "causal",
}
PAIRS = [(a, o) for a in ARCHS for o in OBJECTIVES]


def _raw(arch: str, objective: str) -> dict:
    return {"architecture": dict(ARCHS[arch]), "data": {"name": "digits"}, "objective": dict(OBJECTIVES[objective]),
            "optim": {"batch_size": 8}}


@pytest.mark.parametrize("arch, objective", [p for p in PAIRS if p not in REFUSED])
def test_allowed_pair_takes_a_step(arch: str, objective: str) -> None:
    recipe = validate(_raw(arch, objective))
    data, model = build.experiment(recipe)
    model.setup(data)
    images, labels = data.images[:8], data.targets[:8]
    out = model(model.views(images, torch.Generator().manual_seed(0)), labels)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in model.backbone.parameters() if p.requires_grad]
    assert sum(g.abs().sum() for g in grads if g is not None) > 0
    if arch == "vit-moe":
        assert out["aux_loss"] > 0


@pytest.mark.parametrize("arch, objective", list(REFUSED))
def test_refused_pair_names_the_missing_capability(arch: str, objective: str) -> None:
    with pytest.raises(RecipeError, match=f"objective '{objective}' cannot train architecture "
                                          f"'{ARCHS[arch]['name']}': it needs {REFUSED[arch, objective]}"):
        validate(_raw(arch, objective))
