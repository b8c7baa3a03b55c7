"""Supervised pretraining: cross-entropy with label smoothing (Szegedy et al., 2016) on a linear
classifier over the backbone's pooled features."""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bigmodel.architectures.base import Backbone
from bigmodel.data.transforms import random_crop_flip
from bigmodel.objectives.base import Objective
from bigmodel.registry import OBJECTIVES


@OBJECTIVES.register("supervised")
class Supervised(Objective):
    """Args:
    label_smoothing: ε of label smoothing.
    crop_pad: pixels of random translation (pad-and-crop); 0 disables it.
    flip: random horizontal flips.
    """

    needs_labels = True

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1,
        crop_pad: Annotated[int, Field(ge=0)] = 4,
        flip: bool = True,
    ):
        super().__init__(backbone)
        if num_classes < 2:
            raise ValueError("objective 'supervised' needs labelled data with at least 2 classes")
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.label_smoothing = label_smoothing
        self.crop_pad = crop_pad
        self.flip = flip

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        x = self.to_input(images)
        return [random_crop_flip(x, generator, pad=self.crop_pad, flip=self.flip)]

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """views: ``[(B, C, H, W)]``; labels ``(B,)`` → loss and top-1 accuracy on the batch."""
        logits = self.head(self.backbone(views[0]))
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc}
