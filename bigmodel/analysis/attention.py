"""Attention rollout for ViT backbones (Abnar & Zuidema, 2020, "Quantifying Attention Flow in
Transformers"): per block, the attention matrix averaged over heads, plus the identity for the
residual path and renormalised, ``Â_l = (A_l + I) / 2``; the rollout is the product
``Â_L ⋯ Â_1``, and the class token's row over the patch tokens is the map shown.

The attention weights are recomputed from each block's attention input (a forward hook on
``blocks[i].attn``) with that module's own ``qkv``, ``q_norm``/``k_norm`` and ``scale``, so the
fused (SDPA) kernel needs no change."""

from __future__ import annotations

from pathlib import Path

import torch

from bigmodel.architectures.timm_backbone import TimmBackbone
from bigmodel.architectures.vit import ViT
from bigmodel.data.transforms import to_input


def _vit(model: torch.nn.Module):
    """The backbone when it is a ViT whose rollout this module draws: ours, or a timm
    VisionTransformer behind the ``timm`` architecture with one prefix (class) token and timm's
    standard attention modules; else None."""
    net = getattr(model, "backbone", model)
    if isinstance(net, ViT):
        return net
    if isinstance(net, TimmBackbone) and net.has_tokens and net.model.num_prefix_tokens == 1 and all(
            hasattr(getattr(b, "attn", None), "qkv") for b in net.model.blocks):
        return net
    return None


def _blocks(net: torch.nn.Module) -> torch.nn.Module:
    """The transformer blocks of a backbone :func:`_vit` accepts."""
    return net.vit.blocks if hasattr(net, "vit") else net.model.blocks


@torch.no_grad()
def attention_maps(net: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Attention weights of every block for inputs ``x`` ``(B, C, H, W)`` (normalised floats):
    a list of ``(B, heads, T, T)``, rows summing to 1, ``T = 1 + num_patches``."""
    maps: list[torch.Tensor] = []

    def grab(attn: torch.nn.Module, args: tuple, _out: torch.Tensor) -> None:
        h = args[0]
        b, t, _ = h.shape
        qkv = attn.qkv(h).reshape(b, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        maps.append(((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(-1))

    hooks = [blk.attn.register_forward_hook(grab) for blk in _blocks(net)]
    was_training = net.training
    net.eval()
    try:
        net.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    return maps


def rollout(maps: list[torch.Tensor]) -> torch.Tensor:
    """Rollout ``(B, T, T)`` of per-block attention ``[(B, heads, T, T)]``; rows sum to 1."""
    out = None
    for a in maps:
        a = a.mean(1)
        a = a + torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out


def cls_maps(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """uint8 images ``(B, C, H, W)`` → the class token's rollout over the patches ``(B, g, g)``
    (``g = image_size / patch_size``), each map renormalised to sum to 1."""
    dev = next(net.parameters()).device
    x = to_input(images, net.image_size, net.in_chans).to(dev)
    r = rollout(attention_maps(net, x))[:, 0, 1:]
    g = net.image_size // net.patch_size
    return (r / r.sum(-1, keepdim=True)).reshape(len(x), g, g).cpu()


def make(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, out: Path) -> Path | None:
    """Write ``out/attention.png``: each image above its rollout map (one cell per patch, one
    colour scale for all); ``None`` for backbones other than ViT."""
    net = _vit(model)
    if net is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = cls_maps(net, images)
    n = len(images)
    lo, hi = float(maps.min()), float(maps.max())
    fig, axes = plt.subplots(2, n, figsize=(1.7 * n + 1.2, 3.9), dpi=100, squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        if img.shape[-1] == 1:
            axes[0, i].imshow(img[..., 0], cmap="gray")
        else:
            axes[0, i].imshow(img)
        axes[0, i].set_title(f"label {int(labels[i])}" if int(labels[i]) >= 0 else "image", fontsize=9)
        im = axes[1, i].imshow(maps[i].numpy(), cmap="inferno", vmin=lo, vmax=hi, interpolation="nearest")
        for ax in axes[:, i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("input")
    axes[1, 0].set_ylabel("rollout\n(per patch)")
    fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.02, pad=0.02, label="share of [CLS]\nattention")
    fig.suptitle("ViT attention rollout: where the class token looks, over all blocks (Abnar & Zuidema 2020)")
    path = Path(out) / "attention.png"
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
