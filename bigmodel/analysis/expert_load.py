"""Expert load of a V-MoE (Riquelme et al., 2021, arXiv:2106.05974): which experts the router uses.

Router decisions are read with forward pre-hooks on every :class:`~bigmodel.architectures.moe.MoEMlp`
of the backbone while it runs in eval mode on the given images: each hook routes its input
tokens with the layer's own :meth:`MoEMlp.route` (top-k of the router's softmax). In eval mode no
choice is dropped, so every choice is served by its expert.

Definitions. A layer sees ``S`` tokens (every token of every image, the class token included) and
each makes ``k = top_k`` choices. The *share* of expert ``e`` in a layer is the fraction of the
``S · k`` choices that picked ``e``: a layer's shares sum to 1 (``1 / E`` each when balanced; an
expert's share of *tokens* is ``k`` times its share). The *class share* is the same fraction over
the choices of the tokens of the images of one class, in the last MoE layer (each row sums to 1).

:func:`make` writes ``expert_load.png``: a heat-map MoE layer × expert, and one class × expert.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from bigmodel.architectures.moe import MoEMlp

BATCH = 256  # images per forward pass


class ExpertLoad(NamedTuple):
    """``blocks``: the transformer block index of each MoE layer; ``shares`` ``(L, E)``;
    ``classes``: the known labels in ascending order; ``class_shares`` ``(len(classes), E)`` for
    the last MoE layer (no rows when no image has a label)."""

    blocks: list[int]
    shares: torch.Tensor
    classes: list[int]
    class_shares: torch.Tensor


def moe_layers(backbone: nn.Module) -> list[tuple[int, MoEMlp]]:
    """``(block index, MoEMlp)`` of every MoE layer of a ``vit`` backbone, in depth order."""
    blocks = getattr(getattr(backbone, "vit", None), "blocks", None)
    if blocks is None:
        return []
    return [(i, b.mlp) for i, b in enumerate(blocks) if isinstance(getattr(b, "mlp", None), MoEMlp)]


@torch.no_grad()
def expert_load(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> ExpertLoad | None:
    """Shares of routing choices per expert (see the module docstring) over uint8 ``images``
    ``(N, C, H, W)`` with ``labels`` ``(N,)`` (-1 = unknown); None without MoE layers."""
    net = model.backbone
    layers = moe_layers(net)
    if not layers:
        return None
    e = layers[0][1].cfg.experts
    labels = torch.as_tensor(labels).long()
    classes = sorted({int(c) for c in labels if c >= 0})
    row = {c: i for i, c in enumerate(classes)}
    counts = torch.zeros(len(layers), e, dtype=torch.float64)
    class_counts = torch.zeros(len(classes), e, dtype=torch.float64)
    batch_labels: list[torch.Tensor] = []

    def hook(index: int):
        def count(module: MoEMlp, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]  # (B, N, D)
            chosen = module.route(x.reshape(-1, x.shape[-1])).expert.view(len(x), -1).cpu()  # (B, N·k)
            counts[index] += torch.bincount(chosen.flatten(), minlength=e).double()
            if index == len(layers) - 1:
                for lab, picks in zip(batch_labels[0].tolist(), chosen, strict=True):
                    if lab >= 0:
                        class_counts[row[lab]] += torch.bincount(picks, minlength=e).double()
        return count

    handles = [m.register_forward_pre_hook(hook(i)) for i, (_, m) in enumerate(layers)]
    was = net.training
    net.eval()
    dev = next(net.parameters()).device
    try:
        for start in range(0, len(images), BATCH):
            batch_labels[:] = [labels[start:start + BATCH]]
            net(model.to_input(torch.as_tensor(images[start:start + BATCH])).to(dev))
    finally:
        net.train(was)
        for h in handles:
            h.remove()
    class_shares = class_counts / class_counts.sum(1, keepdim=True).clamp_min(1)
    return ExpertLoad([i for i, _ in layers], counts / counts.sum(1, keepdim=True), classes, class_shares)


def make(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, out: Path) -> Path | None:
    """Write ``out/expert_load.png`` for a ViT with MoE layers; None for any other backbone."""
    if not moe_layers(getattr(model, "backbone", None)):
        return None
    load = expert_load(model, images, labels)
    top_k = moe_layers(model.backbone)[0][1].cfg.top_k
    return _figure(load, top_k, Path(out) / "expert_load.png")


def _figure(load: ExpertLoad, top_k: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    e = load.shares.shape[1]
    panels = [(load.shares.numpy(), [f"block {b}" for b in load.blocks], "MoE layer (block, from 0)",
               f"Share of routing choices per expert (top-{top_k}; balanced = 1/{e})")]
    if load.classes:
        panels.append((load.class_shares.numpy(), [str(c) for c in load.classes], "class",
                       f"Which classes go to which expert (block {load.blocks[-1]})"))
    heights = [max(1.5, 0.35 * len(p[1]) + 1.0) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(5.5, 0.6 * e + 2.5), sum(heights) + 0.6),
                             dpi=100, squeeze=False, gridspec_kw={"height_ratios": heights})
    top = max(float(p[0].max()) for p in panels) or 1.0  # one colour scale for both panels
    for ax, (values, names, ylabel, title) in zip(axes[:, 0], panels, strict=True):
        im = ax.imshow(values, cmap="viridis", vmin=0, vmax=top, aspect="auto")
        ax.set_xticks(range(e), [str(i) for i in range(e)])
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("expert")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        if values.size <= 160:  # numbers stay readable
            for (r, c), v in np.ndenumerate(values):
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * top else "black")
        fig.colorbar(im, ax=ax, label="share")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
