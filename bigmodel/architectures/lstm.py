"""A multi-layer LSTM (Hochreiter & Schmidhuber, 1997) over the raster sequence of patches.

Two modes:

- features (``causal: false``, the default): patches (timm's ``PatchEmbed``; ``patch_size: 1``
  reads pixels) in row-major order through a bidirectional LSTM;
- causal (``causal: true``): a unidirectional LSTM. With ``patch_size: 1`` it is also a
  PixelRNN-like model of colour-token sequences (van den Oord et al., 2016): every pixel is
  quantised to a k-means palette, embedded, and the sequence is shifted right behind a learned
  start token (the :class:`~bigmodel.architectures.sequence.SequenceModel` interface), so it
  provides the ``causal`` capability the autoregressive objective needs. Over larger patches a
  causal LSTM is only a unidirectional feature extractor (no token vocabulary), without ``causal``.

Pooled features: the mean over time of the top layer's outputs (both directions concatenated
when bidirectional), after a LayerNorm. The mean rather than the last state, because in a
unidirectional model the last state is dominated by the bottom-right corner of the image.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import torch
from pydantic import Field
from timm.layers import PatchEmbed
from torch import nn

from bigmodel.architectures.base import CAUSAL
from bigmodel.architectures.sequence import Palette, SequenceModel
from bigmodel.registry import ARCHITECTURES

DEFAULT_PATCH = 4


@ARCHITECTURES.register("lstm")
class LSTM(SequenceModel):
    """LSTM backbone.

    Args:
        image_size: input side in pixels.
        patch_size: patch side (1 = pixels); ``image_size`` must be divisible by it.
        in_chans: input channels.
        hidden: LSTM width per direction (also the embedding width).
        layers: stacked LSTM layers.
        causal: unidirectional; with ``patch_size: 1`` a causal model of colour tokens.
        colours: palette size of the causal token model (unused otherwise).
    """

    family = "recurrent"

    def __init__(
        self,
        image_size: Annotated[int, Field(ge=1)] = 32,
        patch_size: Annotated[int, Field(ge=1)] = DEFAULT_PATCH,
        in_chans: Annotated[int, Field(ge=1)] = 3,
        hidden: Annotated[int, Field(ge=1)] = 128,
        layers: Annotated[int, Field(ge=1)] = 2,
        causal: bool = False,
        colours: Annotated[int, Field(ge=2)] = 16,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"architecture.image_size={image_size} is not divisible by patch_size={patch_size}")
        self.token_mode = causal and patch_size == 1
        if self.token_mode:
            self.palette = Palette(colours, in_chans)
            self.token_embed = nn.Embedding(colours, hidden)
            self.start_token = nn.Parameter(torch.zeros(1, 1, hidden))
            nn.init.normal_(self.token_embed.weight, std=0.02)
            nn.init.normal_(self.start_token, std=0.02)
        else:
            self.patch_embed = PatchEmbed(image_size, patch_size, in_chans, hidden)
        self.lstm = nn.LSTM(hidden, hidden, layers, batch_first=True, bidirectional=not causal)
        out = hidden * (1 if causal else 2)
        self.norm = nn.LayerNorm(out)
        self.feature_dim = self.token_dim = out
        self.in_chans = in_chans
        self.image_size = image_size
        self.patch_size = patch_size
        self.causal = causal

    @classmethod
    def capabilities(cls, **cfg: Any) -> set[str]:
        causal = cfg.get("causal", False) and cfg.get("patch_size", DEFAULT_PATCH) == 1
        return {CAUSAL} if causal else set()

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.lstm(x)[0])

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` colour indices → ``(B, T, hidden)``; position t has seen tokens < t."""
        if not self.token_mode:
            raise RuntimeError("forward_tokens needs lstm with causal: true and patch_size: 1")
        x = self.token_embed(tokens[:, :-1])
        return self._run(torch.cat([self.start_token.expand(len(tokens), -1, -1), x], 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` → per-step outputs ``(B, T, feature_dim)``, T patches row-major."""
        if self.token_mode:
            return self.forward_tokens(self.tokens(x))
        return self._run(self.patch_embed(x))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(1)

    def block_features(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """After each LSTM layer (``layer1`` … ``layerN``): the layer's outputs through the final
        LayerNorm, averaged over time as :meth:`pool` does; the last equals ``self(x)``. The stacked
        ``nn.LSTM`` is run one layer at a time with its own weights (no copy)."""
        from torch.func import functional_call

        lstm = self.lstm
        if self.token_mode:
            tokens = self.tokens(x)
            h = torch.cat([self.start_token.expand(len(tokens), -1, -1), self.token_embed(tokens[:, :-1])], 1)
        else:
            h = self.patch_embed(x)
        out = []
        for k in range(lstm.num_layers):
            one = nn.LSTM(h.shape[-1], lstm.hidden_size, 1, batch_first=True, bidirectional=lstm.bidirectional,
                          device="meta")
            params = {f"{m[1]}_l0{m[3] or ''}": p for name, p in lstm.named_parameters()
                      if (m := re.fullmatch(r"(\w+?)_l(\d+)(_reverse)?", name)) and int(m[2]) == k}
            h = functional_call(one, params, (h,))[0]
            out.append((f"layer{k + 1}", self.pool(self.norm(h))))
        return out
