"""Linear centred kernel alignment between the layers of two backbones (Kornblith et al., 2019,
"Similarity of Neural Network Representations Revisited", arXiv:1905.00414).

For features ``X (n, p)`` and ``Y (n, q)`` of the same ``n`` images, centred over the images,

    CKA(X, Y) = ||Yᵀ X||²_F / (||Xᵀ X||_F · ||Yᵀ Y||_F),

which is HSIC(K, L) / sqrt(HSIC(K, K) · HSIC(L, L)) with linear kernels ``K = X Xᵀ``,
``L = Y Yᵀ``. It is 1 for identical representations, invariant to orthogonal transforms and
isotropic scaling of either side (not to arbitrary invertible linear maps), and compares layers of
different widths. :func:`matrix` computes it between every pair of layers; :func:`heatmap_png`
draws it.
"""

from __future__ import annotations

from pathlib import Path

import torch


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of features ``x (n, p)`` and ``y (n, q)`` of the same ``n`` examples, in [0, 1].

    Computed in float64 with the feature-space form (``p × q`` products, never ``n × n``).
    Raises ``ValueError`` when the row counts differ or either side is constant (zero after
    centring), where CKA is undefined.
    """
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"linear_cka needs (n, p) and (n, q) features of the same n examples, "
                         f"got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    xx = torch.linalg.matrix_norm(x.T @ x)
    yy = torch.linalg.matrix_norm(y.T @ y)
    if xx == 0 or yy == 0:
        raise ValueError("linear_cka: a representation is constant over the examples (CKA is undefined)")
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / (xx * yy))


def matrix(feats_a: list[tuple[str, torch.Tensor]], feats_b: list[tuple[str, torch.Tensor]]) -> dict:
    """CKA between every layer of ``a`` (rows) and every layer of ``b`` (columns).

    Args:
        feats_a, feats_b: ``[(layer name, (n, d_i)), ...]`` on the same ``n`` images, as
            :meth:`~bigmodel.architectures.base.Backbone.block_features` returns, concatenated
            over batches.

    Returns:
        ``{"rows": [names of a], "cols": [names of b], "cka": [[float] * len(b)] * len(a)}``.
    """
    return {"rows": [n for n, _ in feats_a], "cols": [n for n, _ in feats_b],
            "cka": [[round(linear_cka(fa, fb), 6) for _, fb in feats_b] for _, fa in feats_a]}


def heatmap_png(result: dict, path: Path, label_a: str, label_b: str, title: str) -> Path:
    """The matrix of :func:`matrix` as a heat map: ``label_a``'s layers up the y axis and
    ``label_b``'s along the x axis, shallowest at the bottom left (so matching layers of twin
    networks lie on the diagonal), values written in the cells when there are at most 16 layers, a
    colour bar on the fixed range [0, 1]. Written to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.array(result["cka"], dtype=float)
    rows, cols = result["rows"], result["cols"]
    side = max(4.0, 0.55 * max(len(rows), len(cols)) + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    im = ax.imshow(values, cmap="magma", vmin=0.0, vmax=1.0, origin="lower")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(f"{label_b.replace('_', '-')}: layer")
    ax.set_ylabel(f"{label_a.replace('_', '-')}: layer")
    ax.set_title(title)
    if max(len(rows), len(cols)) <= 16:
        for i in range(len(rows)):
            for j in range(len(cols)):
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if values[i, j] > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="linear CKA")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
