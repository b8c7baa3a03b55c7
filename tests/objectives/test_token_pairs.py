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
IGPT_ABOVE_FEATURES = tuple(f"blocks.{i}.{p}" for i in (2, 3) for p in (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")) + (
    "norm.weight", "norm.bias")
# Backbone parameters the step leaves without gradient. iGPT's features are its middle block's, so a
# non-autoregressive objective never reaches the blocks above; MAE on the 2-expert MoE sends the 16
# tokens of this batch (8 images × 1 visible patch + class token; masks from the step's generator,
# seed 0) all to expert 0 of block 2.
NO_GRAD = {
    ("igpt", "supervised"): IGPT_ABOVE_FEATURES,
    ("vit-moe", "mae"): tuple(f"vit.blocks.2.mlp.experts.1.{p}" for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")),
}


def reference_balance_loss(router_logits: list[torch.Tensor], experts: int, top_k: int, weight: float) -> torch.Tensor:
    """Switch Transformer's load-balancing loss summed over MoE layers: weight · E · Σ_e f_e P_e, with
    f_e the share of top-k choices routed to expert e and P_e its mean router probability."""
    total = torch.zeros(())
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        chosen = probs.topk(top_k, dim=-1).indices.flatten()
        f = torch.stack([(chosen == e).float().mean() for e in range(experts)])
        total = total + weight * experts * (f * probs.mean(0)).sum()
    return total


def _raw(arch: str, objective: str) -> dict:
    return {"architecture": dict(ARCHS[arch]), "data": {"name": "digits"}, "objective": dict(OBJECTIVES[objective]),
            "optim": {"batch_size": 8}}


@pytest.mark.parametrize("arch, objective", [p for p in PAIRS if p not in REFUSED])
def test_allowed_pair_takes_a_step(arch: str, objective: str) -> None:
    recipe = validate(_raw(arch, objective))
    data, model = build.experiment(recipe)
    model.setup(data)
    images, labels = data.images[:8], data.targets[:8]
    logits: list[torch.Tensor] = []
    routers = [m for name, m in model.backbone.named_modules() if name.endswith("mlp.router")]
    handles = [r.register_forward_hook(lambda m, a, out: logits.append(out.detach())) for r in routers]
    out = model(model.views(images, torch.Generator().manual_seed(0)), labels)
    for h in handles:
        h.remove()
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    without = [n for n, p in model.backbone.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert without == [n for n in trainable if n in NO_GRAD.get((arch, objective), ())]
    if arch == "vit-moe":  # 4 MoE layers (every: 1, ViT-nano's 4 blocks), each adding its weighted balance loss
        assert len(logits) == 4
        torch.testing.assert_close(out["aux_loss"], reference_balance_loss(logits, experts=2, top_k=1, weight=0.01))
    else:
        assert "aux_loss" not in out


@pytest.mark.parametrize("arch, objective", list(REFUSED))
def test_refused_pair_names_the_missing_capability(arch: str, objective: str) -> None:
    with pytest.raises(RecipeError, match=f"objective '{objective}' cannot train architecture "
                                          f"'{ARCHS[arch]['name']}': it needs {REFUSED[arch, objective]}"):
        validate(_raw(arch, objective))
