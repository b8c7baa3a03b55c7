"""Every architecture × every objective, taken from the registries: each pair the capabilities
allow takes a forward/backward step at tiny size through the recipe builder; each one they refuse
is rejected by validation, naming the missing capabilities. A new objective or architecture is
paired with all the others here without editing this file (an architecture needs its tiny
settings in :data:`ARCHS`, which a test checks)."""

from __future__ import annotations

import pytest
import torch

from bigmodel.recipe import RecipeError, validate
from bigmodel.registry import ARCHITECTURES, OBJECTIVES
from bigmodel.train import build

# Tiny settings per registered architecture (1 channel, as digits), and variants whose settings
# change what the backbone can do or how it computes (MoE blocks, a causal LSTM).
ARCHS = {
    "vit": {"name": "vit", "size": "nano", "image_size": 8, "patch_size": 4, "in_chans": 1},
    "vit-moe": {"name": "vit", "size": "nano", "image_size": 8, "patch_size": 4, "in_chans": 1,
                "moe": {"experts": 2, "top_k": 1, "every": 1}},
    "resnet": {"name": "resnet", "depth": 18, "width": 0.25, "image_size": 8, "in_chans": 1,
               "zero_init_last": False},  # zero last convs would leave their branches without gradient
    "lstm": {"name": "lstm", "image_size": 8, "patch_size": 4, "in_chans": 1, "hidden": 8, "layers": 1},
    "lstm-causal": {"name": "lstm", "image_size": 4, "patch_size": 1, "in_chans": 1, "hidden": 8, "layers": 1,
                    "causal": True, "colours": 4},
    "igpt": {"name": "igpt", "size": "tiny", "image_size": 4, "in_chans": 1, "colours": 4},
    "timm": {"name": "timm", "model": "deit_tiny_patch16_224", "image_size": 8, "in_chans": 1,
             "model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}},
}
# What each variant can do (checked against the registry's capabilities, so that the refused pairs
# below are the ones these capabilities imply, not whatever the registry says).
CAPABILITIES = {"vit": {"tokens"}, "vit-moe": {"tokens"}, "resnet": set(), "lstm": set(), "lstm-causal": {"causal"},
                "igpt": {"causal"}, "timm": {"tokens"}}
# Smaller heads for speed; an objective not listed runs at its defaults.
OBJECTIVE_SETTINGS = {"supervised": {"crop_pad": 1},
                      "mae": {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2},
                      "autoregressive": {"palette_images": 64},
                      "simclr": {"proj_hidden": 16, "proj_dim": 8}}


def needs(objective: str) -> set[str]:
    return set(OBJECTIVES.get(objective).requires)


def missing(arch: str, objective: str) -> list[str]:
    return sorted(needs(objective) - CAPABILITIES[arch])


PAIRS = [(a, o) for a in ARCHS for o in OBJECTIVES.names()]
IGPT_ABOVE_FEATURES = tuple(f"blocks.{i}.{p}" for i in (2, 3) for p in (
    "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
    "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")) + (
    "norm.weight", "norm.bias")
# MAE on the 2-expert MoE sends the 16 tokens of this batch (8 images × 1 visible patch + class
# token; masks from the step's generator, seed 0) all to expert 0 of block 2.
MAE_MOE_IDLE = tuple(f"vit.blocks.2.mlp.experts.1.{p}" for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"))


def no_grad(arch: str, objective: str) -> tuple[str, ...]:
    """Backbone parameters the step leaves without gradient. iGPT's features are its middle block's,
    so an objective that reads features (one that does not need the causal sequence) never reaches
    the blocks above."""
    if arch == "igpt" and "causal" not in needs(objective):
        return IGPT_ABOVE_FEATURES
    return MAE_MOE_IDLE if (arch, objective) == ("vit-moe", "mae") else ()


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
    return {"architecture": dict(ARCHS[arch]), "data": {"name": "digits"},
            "objective": {"name": objective, **OBJECTIVE_SETTINGS.get(objective, {})}, "optim": {"batch_size": 8}}


def test_every_architecture_has_tiny_settings() -> None:
    assert sorted({a["name"] for a in ARCHS.values()}) == ARCHITECTURES.names()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_capabilities_are_the_registry_s(arch: str) -> None:
    section = {k: v for k, v in ARCHS[arch].items() if k != "name"}
    assert ARCHITECTURES.get(ARCHS[arch]["name"]).capabilities(**section) == CAPABILITIES[arch]


@pytest.mark.parametrize("arch, objective", [p for p in PAIRS if not missing(*p)])
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
    without = [n for n, p in model.backbone.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert without == [n for n in trainable if n in no_grad(arch, objective)]
    if arch == "vit-moe":  # 4 MoE layers (every: 1, ViT-nano's 4 blocks), each adding its weighted balance loss
        assert len(logits) == 4
        torch.testing.assert_close(out["aux_loss"], reference_balance_loss(logits, experts=2, top_k=1, weight=0.01))
    else:
        assert "aux_loss" not in out


@pytest.mark.parametrize("arch, objective", [p for p in PAIRS if missing(*p)])
def test_refused_pair_names_the_missing_capability(arch: str, objective: str) -> None:
    with pytest.raises(RecipeError, match=f"objective '{objective}' cannot train architecture "
                                          f"'{ARCHS[arch]['name']}': it needs {', '.join(missing(arch, objective))}"):
        validate(_raw(arch, objective))
