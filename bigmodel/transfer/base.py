"""Transfer protocols and frozen-feature extraction (DESIGN.md §3).

A protocol scores a backbone on a task (a train split and a test split). Frozen-feature protocols
(:class:`FrozenProtocol`) see only features, so the same protocol also scores raw pixels: the
baseline that shows what pretraining bought.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from bigmodel.architectures.base import Backbone
from bigmodel.data.base import TensorImages
from bigmodel.data.transforms import to_input


@torch.inference_mode()
def features(backbone: Backbone, data: TensorImages, batch_size: int = 256,
             dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pooled features ``(N, feature_dim)`` (float32, CPU) of every image, backbone in eval mode."""
    was_training = backbone.training
    backbone.eval()
    dev = next(backbone.parameters()).device
    out = []
    for i in range(0, len(data), batch_size):
        x = to_input(data.images[i:i + batch_size], backbone.image_size, backbone.in_chans).to(dev)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out.append(backbone(x).float().cpu())
    backbone.train(was_training)
    return torch.cat(out)


def pixels(data: TensorImages) -> torch.Tensor:
    """Raw-pixel features ``(N, C·H·W)`` in [0, 1]."""
    return data.images.flatten(1).float() / 255.0


class Protocol:
    """Base of all protocols. ``frozen`` protocols implement :meth:`fit_score`."""

    frozen: ClassVar[bool] = True

    def settings(self) -> dict[str, Any]:
        """The exact settings that produced a number (evaluation provenance)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def fit_score(self, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                  y_test: torch.Tensor) -> dict[str, float]:
        """Fit on ``(N, D)`` train features, return at least ``{"top1": accuracy in %}`` on test."""
        raise NotImplementedError
