"""The backbone interface every architecture implements (DESIGN.md §2).

A backbone maps images ``(B, in_chans, image_size, image_size)`` (float, normalised by
:func:`bigmodel.data.transforms.to_input`) to features. Heads and losses live in objectives and
transfer protocols, never here, so any backbone composes with any compatible objective.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

# Capabilities an objective may require (see Objective.requires).
TOKENS = "tokens"  # patch tokens (B, N, D) with a token-dropping path (needed by MAE)
CAUSAL = "causal"  # autoregressive over a token sequence (needed by next-pixel prediction)


class Backbone(nn.Module):
    """Base class. Subclasses set ``feature_dim``, ``in_chans``, ``image_size``."""

    provides: ClassVar[frozenset[str]] = frozenset()
    feature_dim: int
    in_chans: int
    image_size: int

    @classmethod
    def capabilities(cls, **cfg: Any) -> set[str]:
        """Capabilities of the backbone a recipe section would build (before building it)."""
        return set(cls.provides)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, D)`` or a feature map ``(B, C, H, W)``."""
        raise NotImplementedError

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, feature_dim)`` from :meth:`forward_features`'s output."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
