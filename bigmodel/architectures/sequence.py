"""Images as token sequences, for autoregressive objectives (ImageGPT, PixelRNN).

A :class:`SequenceModel` backbone reads an image as the raster-order sequence of its pixels,
each quantised to the nearest colour of a :class:`Palette` (k-means centres, as in ImageGPT,
Chen et al., 2020). Its interface, shared by ``igpt`` and a causal ``lstm``:

- ``tokens(x)``: normalised images ``(B, C, H, W)`` → colour indices ``(B, T)``, ``T = H·W``;
- ``forward_tokens(tokens)`` → hidden states ``(B, T, token_dim)``, where position ``t`` has seen
  only ``tokens[:, :t]`` (the sequence is shifted right behind a learned start token), so a
  linear head on position ``t`` predicts token ``t``;
- ``decode(tokens)`` → images ``(B, C, H, W)`` made of palette colours;
- ``forward_features(x)`` → per-position states ``(B, T, D)`` with the same causality as
  ``forward_tokens`` (what a generative fine-tune's next-pixel head reads, see
  :class:`bigmodel.objectives.classifier.Classifier`).

``token_mode`` says whether an instance is such a model (an ``lstm`` over patches is not).

The palette lives in buffers of the backbone, so it is saved with the weights and restored on
load. Until it is fitted (:meth:`Palette.fit`, called by the objective's ``setup`` on the
pretraining data) it holds evenly spaced grey levels, so an unfitted model still runs.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bigmodel.architectures.base import Backbone


class Palette(nn.Module):
    """``colours`` ``(K, C)`` in the backbone's normalised input space, sorted by brightness.

    Args:
        size: number of colours ``K``.
        channels: ``C``.
    """

    def __init__(self, size: int, channels: int):
        super().__init__()
        grey = torch.linspace(-1, 1, size)[:, None].expand(size, channels)
        self.register_buffer("colours", grey.clone())
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @property
    def size(self) -> int:
        return len(self.colours)

    def fit(self, pixels: torch.Tensor, seed: int = 0, max_pixels: int = 200_000) -> None:
        """k-means (scikit-learn's MiniBatchKMeans) on ``(P, C)`` pixel values; at most
        ``max_pixels`` of them, drawn at random with ``seed``."""
        from sklearn.cluster import MiniBatchKMeans

        pixels = pixels.detach().float().cpu()
        if len(pixels) > max_pixels:
            pixels = pixels[torch.randperm(len(pixels), generator=torch.Generator().manual_seed(seed))[:max_pixels]]
        data = pixels.numpy().astype(np.float64)
        distinct = len(np.unique(data.round(4), axis=0))
        if distinct < self.size:
            raise ValueError(f"cannot fit a {self.size}-colour palette to {distinct} distinct colours; "
                             f"lower the architecture's colours")
        km = MiniBatchKMeans(n_clusters=self.size, random_state=seed, n_init=3, batch_size=4096)
        centres = torch.from_numpy(km.fit(data).cluster_centers_).float()
        centres = centres[centres.sum(1).argsort()]
        self.colours.copy_(centres.to(self.colours.device))
        self.fitted.fill_(True)

    def quantise(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` → nearest-colour indices ``(B, H·W)`` in raster order."""
        pix = x.flatten(2).transpose(1, 2).float()  # (B, T, C)
        colours = self.colours.float()
        dist = (pix.pow(2).sum(-1, keepdim=True) - 2 * pix @ colours.T + colours.pow(2).sum(-1))
        return dist.argmin(-1)

    def decode(self, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """Indices ``(B, side²)`` → images ``(B, C, side, side)``."""
        return self.colours[tokens].transpose(1, 2).reshape(len(tokens), -1, side, side)


class SequenceModel(Backbone):
    """A backbone that is also a causal model of pixel-token sequences (see the module docstring).

    Subclasses set ``palette``, ``token_dim`` and ``image_size`` and implement ``forward_tokens``.
    """

    palette: Palette
    token_dim: int
    token_mode: bool = True

    @property
    def vocab_size(self) -> int:
        return self.palette.size

    @property
    def seq_len(self) -> int:
        return self.image_size**2

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.palette.quantise(x)

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.palette.decode(tokens, self.image_size)
