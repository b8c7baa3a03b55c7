"""MAE original / masked / reconstruction grids (He et al., 2022, Fig. 2-3) from the objective's
own :meth:`~bigmodel.objectives.mae.MAE.reconstruct` (a fixed-seed mask, so a figure is
reproducible and the caller's RNG state is untouched)."""

from __future__ import annotations

from pathlib import Path

import torch

from bigmodel.data.transforms import MEAN, STD
from bigmodel.objectives.mae import MAE

ROWS = 6  # images shown, at most
COLUMNS = (("input", "original"), ("masked", "masked"), ("reconstruction", "reconstruction\n(visible + predicted)"),
           ("prediction", "prediction\n(every patch)"))


def reconstruct(model: torch.nn.Module, images: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """:meth:`MAE.reconstruct` of uint8 ``images`` under the mask drawn from ``seed`` (on CPU
    tensors; the global RNG is restored afterwards)."""
    dev = next(model.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        out = model.reconstruct(images.to(dev))
    return {k: v.float().cpu() for k, v in out.items()}


def to_display(x: torch.Tensor) -> torch.Tensor:
    """Normalised inputs ``(C, H, W)`` → ``(H, W, C)`` in [0, 1] for imshow."""
    return (x * STD + MEAN).clamp(0, 1).permute(1, 2, 0)


def make(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, out: Path) -> Path | None:
    """Write ``out/reconstruction.png`` (one row per image, at most :data:`ROWS`); ``None`` for objectives
    other than MAE."""
    if not isinstance(model, MAE):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, labels = images[:ROWS], labels[:ROWS]
    res = reconstruct(model, images)
    n = len(images)
    fig, axes = plt.subplots(n, len(COLUMNS), figsize=(2.0 * len(COLUMNS), 2.0 * n + 0.6), dpi=100, squeeze=False)
    for i in range(n):
        for j, (key, title) in enumerate(COLUMNS):
            img = to_display(res[key][i]).numpy()
            ax = axes[i, j]
            if img.shape[-1] == 1:
                ax.imshow(img[..., 0], cmap="gray", vmin=0, vmax=1)
            else:
                ax.imshow(img)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=9)
        axes[i, 0].set_ylabel(f"label {int(labels[i])}" if int(labels[i]) >= 0 else f"image {i}", fontsize=9)
    ratio = float(res["mask"].mean())
    fig.suptitle(f"MAE reconstructions ({ratio:.0%} of patches masked)")
    fig.tight_layout()
    path = Path(out) / "reconstruction.png"
    fig.savefig(path)
    plt.close(fig)
    return path
