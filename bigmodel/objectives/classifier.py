"""The fine-tuned classifier: a backbone with a task head, trained as an objective by the
finetune protocol (:mod:`bigmodel.transfer.finetune`, BiT-HyperRule) through the one training
loop, with the schedule that sets its training and test views.

It lives with the objectives, below the engine, because a fine-tune checkpoint holds one: the
loader (:mod:`bigmodel.loader`) rebuilds it, test view included, from the checkpoint alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.architectures.base import Backbone
from bigmodel.architectures.sequence import SequenceModel
from bigmodel.data.transforms import random_crop, random_crop_flip, to_input
from bigmodel.objectives.autoregressive import next_pixel_head, next_pixel_loss
from bigmodel.objectives.base import Objective


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A fine-tuning schedule: what :func:`bigmodel.transfer.finetune.hyperrule` chose (plus any overrides)."""

    regime: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    decay_steps: tuple[int, ...]
    decay_factor: float
    mixup_alpha: float
    momentum: float
    weight_decay: float
    resize: int  # training images are resized to resize², then randomly cropped to crop²
    crop: int
    test_size: int
    decay: str = "step"  # "step": ×decay_factor at each of decay_steps (BiT); "cosine": to 0 (MAE, BEiT)
    translate: int = 0  # random shift of each training crop by up to ± this many pixels (reflect-pad, crop)

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr``, then ×``decay_factor`` at each of ``decay_steps``, or a cosine to
        zero at ``steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.decay == "cosine":
            t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return self.lr * 0.5 * (1 + math.cos(math.pi * t))
        return self.lr * self.decay_factor ** sum(step >= s for s in self.decay_steps)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def has_pixel_tokens(backbone: Backbone) -> bool:
    """Whether ``backbone`` is a causal model of pixel tokens (igpt, an lstm with ``causal: true`` and
    ``patch_size: 1``): the backbones whose features can predict the next pixel, which iGPT's joint
    objective (``generative_weight``) needs."""
    return isinstance(backbone, SequenceModel) and backbone.token_mode


class Classifier(Objective):
    """A backbone with a zero-initialised task head, trained as an objective: BiT's training views
    (resize, random crop, optional random shift and flip; MixUp with one λ per batch) and cross-entropy.

    :meth:`logits` maps normalised images ``(B, C, S, S)`` to ``(B, num_classes)``. After
    :meth:`~bigmodel.transfer.finetune.Finetune.fit`, ``train_loss`` is the mean logged training loss
    of the last tenth of steps.

    With ``generative_weight`` w > 0 (a causal :class:`~bigmodel.architectures.sequence.SequenceModel`
    only) it trains on iGPT's joint objective (Chen et al., 2020, §3.4: "L_GEN + L_CLF works even
    better" than L_CLF alone): a second new linear head, ``gen_head``, predicts each position's colour
    token from the same per-position features the class head's pooled features come from, and the loss
    is the classification loss + w · that next-pixel cross-entropy (logged apart as ``gen_loss``). The
    class logits are unchanged (``head(backbone(x))``), so testing, ``predict`` and export ignore it.
    """

    train_loss: float | None = None

    def __init__(self, backbone: Backbone, num_classes: int, schedule: Schedule, flip: bool = False,
                 test_crop: bool = True, generative_weight: float = 0.0):
        super().__init__(backbone)
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # BiT: the new head starts at zero
        nn.init.zeros_(self.head.bias)
        self.schedule, self.flip, self.test_crop = schedule, flip, test_crop
        self.generative_weight, self.gen_head = generative_weight, None
        if generative_weight > 0:
            if not has_pixel_tokens(backbone):
                raise ValueError(f"finetune: generative_weight={generative_weight} needs a causal model of pixel "
                                 f"tokens (igpt, or lstm with causal: true, patch_size: 1), not "
                                 f"{type(backbone).__name__}; set generative_weight: 0")
            self.gen_head = next_pixel_head(backbone)  # as the autoregressive objective's, new

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def test_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` → ``(B, in_chans, crop, crop)``: the centre crop of the image resized
        as in training (objects at the training scale), or with ``test_crop`` off, BiT's whole image
        resized to the crop size."""
        s, c = self.schedule, self.backbone.in_chans
        if not self.test_crop:
            return to_input(images, s.test_size, c)
        o = (s.resize - s.crop) // 2
        return to_input(images, s.resize, c)[..., o:o + s.crop, o:o + s.crop]

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """uint8 ``(B, C, H, W)`` → ``[crops (B, in_chans, crop, crop)]``, plus ``(B,)`` MixUp
        weights (one λ for the batch) when MixUp is on."""
        s = self.schedule
        x = to_input(images, s.resize, self.backbone.in_chans)
        x = random_crop_flip(random_crop(x, s.crop, generator), generator, pad=s.translate, flip=self.flip)
        if s.mixup_alpha <= 0:
            return [x]
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        lam = float(np.random.default_rng(seed).beta(s.mixup_alpha, s.mixup_alpha))
        return [x, torch.full((len(x),), lam)]

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cross-entropy (MixUp: image ``i`` mixed with image ``B - 1 - i`` of the micro-batch, as
        in :mod:`bigmodel.objectives.supervised`) and top-1 on the batch's own labels."""
        x = views[0]
        lam = views[1][:1].to(x.dtype)[:, None, None, None] if len(views) == 2 else None
        if lam is not None:
            x = lam * x + (1 - lam) * x.flip(0)
        if self.gen_head is None:
            logits, gen = self.logits(x).float(), None
        else:  # one pass: per-position features → pooled for the class head, each position for the next pixel
            features = self.backbone.forward_features(x)
            logits = self.head(self.backbone.pool(features)).float()
            gen = next_pixel_loss(self.gen_head(features), self.backbone.tokens(x))
        loss = F.cross_entropy(logits, labels)
        if lam is not None:
            loss = lam.flatten()[0] * loss + (1 - lam.flatten()[0]) * F.cross_entropy(logits, labels.flip(0))
        out = {"acc": (logits.argmax(-1) == labels).float().mean()}
        if gen is not None:
            loss, out["gen_loss"] = loss + self.generative_weight * gen, gen.detach()
        return {"loss": loss, **out}
