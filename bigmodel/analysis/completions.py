"""Half-image completions and unconditional samples of an autoregressive model (ImageGPT: Chen et
al., 2020; PixelRNN: van den Oord et al., 2016).

Everything is drawn by the objective itself (:meth:`Autoregressive.complete` keeps the upper half,
rows ``< H // 2``, of each image's palette tokens and samples the rest; :meth:`Autoregressive.sample`
draws whole images), with a seeded generator, so the figure is reproducible.

:func:`make` writes ``completions.png``: per test image a row ``original | quantised upper half
given | COMPLETIONS completions``, then rows of unconditional samples. Images are at the
backbone's resolution, in palette colours (the original is shown as the model sees it, before
quantisation).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigmodel.data.transforms import MEAN, STD
from bigmodel.objectives.autoregressive import Autoregressive

MAX_IMAGES = 4  # images completed
COMPLETIONS = 3  # completions per image
SAMPLES = 8  # unconditional samples
SEED = 0


def complete(model: nn.Module, images: torch.Tensor, k: int = COMPLETIONS, seed: int = SEED,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``k`` completions of each of uint8 ``images`` ``(N, C, H, W)``.

    Returns, in normalised input space at the backbone's size ``S``:
    the inputs ``(N, C, S, S)``, their palette quantisation ``(N, C, S, S)`` and the completions
    ``(N, k, C, S, S)`` (rows ``< S // 2`` equal the quantisation's).
    """
    net = model.backbone
    dev = model.head.weight.device
    x = model.to_input(images).to(dev)
    quantised = net.decode(net.tokens(x))
    gen = torch.Generator().manual_seed(seed)
    done = model.complete(x.repeat_interleave(k, 0), generator=gen)
    return x, quantised, done.view(len(x), k, *done.shape[1:])


def samples(model: nn.Module, n: int = SAMPLES, seed: int = SEED) -> torch.Tensor:
    """``n`` unconditional samples ``(n, C, S, S)`` in normalised input space (palette colours)."""
    return model.sample(n, generator=torch.Generator().manual_seed(seed + 1))


def make(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, out: Path) -> Path | None:
    """Write ``out/completions.png`` for the ``autoregressive`` objective; None for any other."""
    if not isinstance(model, Autoregressive):
        return None
    images = torch.as_tensor(images)[:MAX_IMAGES]
    x, quantised, done = complete(model, images)
    drawn = samples(model)
    return _figure(x.cpu(), quantised.cpu(), done.cpu(), drawn.cpu(), Path(out) / "completions.png")


def _figure(x: torch.Tensor, quantised: torch.Tensor, done: torch.Tensor, drawn: torch.Tensor,
            path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, k = done.shape[:2]
    cols = max(2 + k, 4)
    sample_rows = -(-len(drawn) // cols)
    rows = n + sample_rows
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.75 * rows + 0.5), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    half = x.shape[-2] // 2
    for i in range(n):
        given = _blank_below(_display(quantised[i]), half)  # the model fills in the rest
        panels = [(_display(x[i]), "original"), (given, "upper half given")]
        panels += [(_display(done[i, j]), f"completion {j + 1}") for j in range(k)]
        for j, (img, title) in enumerate(panels):
            _show(axes[i, j], img, title if i == 0 else None)
            axes[i, j].axhline(half - 0.5, color="red", lw=0.8)
    for s in range(len(drawn)):
        _show(axes[n + s // cols, s % cols], _display(drawn[s]), f"sample {s + 1}")
    fig.suptitle("Completions of the lower half (red line: end of the given rows) and "
                 "unconditional samples", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _show(ax, img: np.ndarray, title: str | None) -> None:
    ax.axis("on")
    ax.set_facecolor("#dddddd")
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=9)


def _blank_below(img: np.ndarray, row: int) -> np.ndarray:
    """``img`` with rows ``>= row`` transparent (NaN for grey, alpha 0 for RGB)."""
    if img.ndim == 2:
        img[row:] = np.nan
        return img
    rgba = np.concatenate([img, np.ones_like(img[..., :1])], -1)
    rgba[row:, :, 3] = 0
    return rgba


def _display(x: torch.Tensor) -> np.ndarray:
    """Normalised ``(C, H, W)`` → ``(H, W)`` (grey) or ``(H, W, 3)`` in [0, 1]."""
    img = (x.float() * STD + MEAN).clamp(0, 1).numpy()
    return img[0].copy() if img.shape[0] == 1 else img.transpose(1, 2, 0).copy()
