"""Confusion matrix of a linear probe on frozen features (the figure fits its own probe; the
transfer protocol's scores are not touched)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.transfer.base import features
from bigmodel.transfer.linear import Linear


def matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts ``(K, K)``: row = true class, column = predicted class (scikit-learn's)."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(true, pred, labels=np.arange(num_classes))


def probe(backbone: torch.nn.Module, train: Any, test: Any, batch: int = 256,
          dtype: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit the linear probe (the ``linear`` protocol with its default settings) on
    ``train``'s frozen features; returns ``(true, predicted)`` labels of ``test``, each ``(N,)``."""
    xtr = features(backbone, train, batch, dtype).numpy()
    xte = features(backbone, test, batch, dtype).numpy()
    scaler, clf, _ = Linear().fit(xtr, train.targets.numpy())  # C chosen as the protocol chooses it
    return test.targets.numpy(), clf.predict(scaler.transform(xte))


def make(backbone: torch.nn.Module, train: Any, test: Any, out: Path, task: str = "task",
         classes: list[str] | None = None, dtype: torch.dtype | None = None) -> tuple[Path, np.ndarray]:
    """Write ``out/confusion.png`` (row-normalised, counts in the cells when there are ≤ 20
    classes); returns its path and the count matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    true, pred = probe(backbone, train, test, dtype=dtype)
    k = max(int(train.num_classes), int(test.num_classes), int(true.max()) + 1, int(pred.max()) + 1)
    counts = matrix(true, pred, k)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    names = list(classes) if classes and len(classes) == k else [str(i) for i in range(k)]
    side = min(10.0, 3.0 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=100)
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 2 else 0)
        ax.set_yticks(range(k), names)
    acc = 100.0 * float((true == pred).mean())
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"Linear probe on {task}: {acc:.1f}% top-1 ({len(true)} test images)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    path = Path(out) / "confusion.png"
    fig.savefig(path)
    plt.close(fig)
    return path, counts
