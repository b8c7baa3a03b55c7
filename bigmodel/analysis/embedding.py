"""A 2-D map of frozen test features coloured by class (t-SNE, van der Maaten & Hinton, 2008, from
scikit-learn), the pretrained backbone beside its random-init twin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.transfer.base import features


def tsne(feats: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(N, D)`` features → ``(N, 2)`` t-SNE coordinates (PCA init, perplexity ≤ 30 and < N)."""
    from sklearn.manifold import TSNE

    n = len(feats)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        np.asarray(feats, dtype=np.float32))


def make(backbones: dict[str, torch.nn.Module], test: Any, out: Path, task: str = "task",
         dtype: torch.dtype | None = None, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """Write ``out/tsne.png``: one panel per backbone (e.g. ``pretrained``, ``random init``), the
    same test images in each; returns its path and the ``(N, 2)`` map of each backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = test.targets.numpy()
    maps = {name: tsne(features(net, test, 256, dtype).numpy(), seed) for name, net in backbones.items()}
    classes = sorted(set(labels.tolist()))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps) + 1.6, 5), dpi=100, squeeze=False)
    for ax, (name, xy) in zip(axes[0], maps.items(), strict=True):
        for i, c in enumerate(classes):
            sel = labels == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=8, color=cmap(i % cmap.N), label=str(c))
        ax.set(title=f"{name}", xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2")
    if len(classes) <= 20:
        axes[0][-1].legend(title="class", loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2, fontsize=8)
    fig.suptitle(f"t-SNE of frozen features, {task} test images ({len(labels)})")
    fig.tight_layout()
    path = Path(out) / "tsne.png"
    fig.savefig(path)
    plt.close(fig)
    return path, maps
