"""Supervised pretraining: cross-entropy with label smoothing (Szegedy et al., 2016) on a linear
classifier over the backbone's pooled features, optionally on MixUp (Zhang et al., 2018,
arXiv:1710.09412) or CutMix (Yun et al., 2019, arXiv:1905.04899) batches.

Mixing follows timm's ``Mixup`` in per-sample ("elem") mode: image ``i`` of a batch is mixed with
image ``B - 1 - i`` (batches are shuffled, so this pairs random images) and its target becomes the
same mixture of the two (smoothed) one-hot labels. :meth:`Supervised.views` draws every random
number from the step's generator and passes them on as a second view, ``(B, 6)`` mixing parameters;
:meth:`Supervised.forward` mixes within the batch it receives, so gradient accumulation (which
splits views and labels into micro-batches) mixes within each micro-batch and stays exact.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bigmodel.architectures.base import Backbone
from bigmodel.data.transforms import random_crop_flip
from bigmodel.objectives.base import Objective
from bigmodel.registry import OBJECTIVES


def mix_params(b: int, generator: torch.Generator, mixup_alpha: float, cutmix_alpha: float,
               prob: float = 1.0, switch_prob: float = 0.5) -> torch.Tensor:
    """Per-sample mixing parameters ``(B, 6)``: ``[lam, cutmix?, y0, y1, x0, x1]``.

    ``lam ~ Beta(α, α)`` is the weight of an image's own content (1 where it is not mixed, with
    probability ``1 - prob``); a sample uses CutMix with ``switch_prob`` when both are enabled. The
    CutMix box, in fractions of the image side, covers a ``1 - lam`` share of the area centred at a
    uniform point and clipped to the image (as timm's ``rand_bbox``).
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    rng = np.random.default_rng(seed)  # Beta draws, seeded from the step's generator
    apply = rng.random(b) < prob
    cut = np.zeros(b, dtype=bool) if cutmix_alpha <= 0 else (
        np.ones(b, dtype=bool) if mixup_alpha <= 0 else rng.random(b) < switch_prob)
    lam = np.where(cut, rng.beta(max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6), b),
                   rng.beta(max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6), b))
    lam = np.where(apply, lam, 1.0)
    side = np.sqrt(1.0 - lam)
    cy, cx = rng.random(b), rng.random(b)
    box = np.stack([cy - side / 2, cy + side / 2, cx - side / 2, cx + side / 2], 1).clip(0, 1)
    return torch.from_numpy(np.concatenate([lam[:, None], (cut & apply)[:, None], box], 1)).float()


def mix(x: torch.Tensor, labels: torch.Tensor, params: torch.Tensor, num_classes: int,
        smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix image ``i`` with image ``B - 1 - i`` by :func:`mix_params`'s ``params``.

    Returns images ``(B, C, H, W)`` and soft targets ``(B, num_classes)``: the smoothed one-hot
    labels of the pair weighted by each image's share of the result (for CutMix, the exact fraction
    of pixels outside the pasted box).
    """
    lam, cut, box = params[:, 0], params[:, 1] > 0.5, params[:, 2:]
    h, w = x.shape[-2:]
    ys = (torch.arange(h, device=x.device) + 0.5) / h
    xs = (torch.arange(w, device=x.device) + 0.5) / w
    inside_y = (ys[None] >= box[:, 0:1]) & (ys[None] < box[:, 1:2])  # (B, H)
    inside_x = (xs[None] >= box[:, 2:3]) & (xs[None] < box[:, 3:4])  # (B, W)
    pasted = (inside_y[:, :, None] & inside_x[:, None, :] & cut[:, None, None])[:, None]  # (B, 1, H, W)
    partner = x.flip(0)
    lam_x = lam.to(x.dtype)[:, None, None, None]
    x = torch.where(cut[:, None, None, None], torch.where(pasted, partner, x), lam_x * x + (1 - lam_x) * partner)
    own = torch.where(cut, 1 - pasted.float().mean((1, 2, 3)), lam)[:, None]  # share of own content
    y = F.one_hot(labels, num_classes).float() * (1 - smoothing) + smoothing / num_classes
    return x, own * y + (1 - own) * y.flip(0)


@OBJECTIVES.register("supervised")
class Supervised(Objective):
    """Args:
    label_smoothing: ε of label smoothing.
    crop_pad: pixels of random translation (pad-and-crop); 0 disables it.
    flip: random horizontal flips.
    mixup_alpha: α of MixUp's Beta(α, α) mixing weights; 0 disables MixUp (0.2-1 is usual).
    cutmix_alpha: α of CutMix's Beta(α, α) box areas; 0 disables CutMix (1.0 is usual).
    mix_prob: probability that an image is mixed at all when MixUp or CutMix is on.
    switch_prob: probability of CutMix rather than MixUp when both are on.
    """

    needs_labels = True

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1,
        crop_pad: Annotated[int, Field(ge=0)] = 4,
        flip: bool = True,
        mixup_alpha: Annotated[float, Field(ge=0)] = 0.0,
        cutmix_alpha: Annotated[float, Field(ge=0)] = 0.0,
        mix_prob: Annotated[float, Field(ge=0, le=1)] = 1.0,
        switch_prob: Annotated[float, Field(ge=0, le=1)] = 0.5,
    ):
        super().__init__(backbone)
        if num_classes < 2:
            raise ValueError("objective 'supervised' needs labelled data with at least 2 classes")
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        self.label_smoothing = label_smoothing
        self.crop_pad = crop_pad
        self.flip = flip
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.mix_prob, self.switch_prob = mix_prob, switch_prob

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """``[augmented images (B, C, H, W)]``, plus ``(B, 6)`` mixing parameters when mixing."""
        x = random_crop_flip(self.to_input(images), generator, pad=self.crop_pad, flip=self.flip)
        if not self.mixing:
            return [x]
        return [x, mix_params(len(x), generator, self.mixup_alpha, self.cutmix_alpha, self.mix_prob,
                              self.switch_prob)]

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """views: ``[(B, C, H, W)]`` (+ mixing parameters); labels ``(B,)`` → loss and top-1
        accuracy on the batch (against each image's own label when mixed)."""
        if len(views) == 2:
            x, targets = mix(views[0], labels, views[1], self.num_classes, self.label_smoothing)
            logits = self.head(self.backbone(x))
            loss = F.cross_entropy(logits, targets)
        else:
            logits = self.head(self.backbone(views[0]))
            loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(-1) == labels).float().mean()
        return {"loss": loss, "acc": acc}
