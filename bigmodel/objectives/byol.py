"""BYOL (Grill et al., 2020, arXiv:2006.07733): Bootstrap Your Own Latent.

Two augmented views of every image pass through the *online* network (the backbone, a projector
and a predictor) and through the *target* network (an exponential moving average of the backbone
and the projector, no predictor, no gradient). The online prediction of each view regresses the
target projection of the other view under a normalised MSE, ``2 - 2 cos(q, z')`` (paper eq. 2),
summed over both orders (eq. 5). There are no negatives: the predictor and the slowly moving
target are what keep the representation from collapsing.

The target follows the online weights after every optimizer step (:meth:`BYOL.after_step`, the
engine's one hook): ``ξ ← τ ξ + (1 - τ) θ`` with ``τ`` rising from ``tau_base`` to 1 along a
cosine over ``momentum_steps`` steps (§3.2: ``τ = 1 - (1 - τ_base)(cos(π k / K) + 1) / 2``).
The target's weights and the number of updates it has taken (``ema_steps``) are part of the
state dict, so a checkpoint carries them and a resumed run continues the same average. The
transfer protocols use the online backbone (``backbone.``), as the paper evaluates it.

Why BYOL rather than DINO for this framework's CPU-sized runs: BYOL's loss has no temperatures,
no centring and no multi-crop, so it trains with the two views every other objective draws and
with small batches (it has no negatives to run short of); DINO's sharpening/centring and its
wide prototype head need tuning per dataset to avoid collapse, and its multi-crop multiplies the
cost of a step.

With several processes the loss is a mean over images, so each rank's loss over its rows and
DDP's average of the gradients give the gradient of the global batch, provided the BatchNorm of
the projector and predictor (both networks) normalises with statistics of the global batch: it
does (:class:`bigmodel.objectives.simclr.GlobalBatchNorm1d`). Every rank then holds the same
online weights after a step and computes the same EMA.
"""

from __future__ import annotations

import copy
import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bigmodel.architectures.base import Backbone
from bigmodel.data import augment
from bigmodel.data.base import ImageDataset
from bigmodel.data.transforms import MEAN, STD, to_input
from bigmodel.objectives.base import Objective
from bigmodel.objectives.simclr import ProjectionHead
from bigmodel.registry import OBJECTIVES

Fraction = Annotated[float, Field(ge=0, le=1)]
Positive = Annotated[float, Field(gt=0)]


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE per row (paper eq. 2): ``‖p/‖p‖ - z/‖z‖‖² = 2 - 2 cos(p, z)``.

    Args:
        p: online predictions ``(N, D)``.
        z: target projections ``(N, D)`` (no gradient flows into them).

    Returns:
        ``(N,)``, each in ``[0, 4]``.
    """
    return 2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)


def byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The symmetrised loss (paper eq. 5), averaged over images: view 1's prediction against view 2's
    target projection plus view 2's against view 1's. ``(N, D)`` each → a scalar in ``[0, 8]``."""
    return (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()


def target_momentum(step: int, steps: int, tau_base: float) -> float:
    """τ after optimizer step ``step`` (0-based) of ``steps``: ``1 - (1 - τ_base)(cos(π k / K) + 1) / 2``
    with ``k = min(step, K)``; ``τ_base`` at step 0, 1 from step ``K`` on (BYOL §3.2)."""
    k = min(step, steps)
    return 1 - (1 - tau_base) * (math.cos(math.pi * k / steps) + 1) / 2


def solarize(x: torch.Tensor, generator: torch.Generator, p: float) -> torch.Tensor:
    """Per image with probability ``p``: pixels ``≥ 0.5`` inverted (``1 - x``), as torchvision's
    ``RandomSolarize(threshold=0.5)`` on ``[0, 1]`` floats. ``(B, C, H, W)`` → same shape."""
    hit = (torch.rand(len(x), generator=generator) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(hit & (x >= 0.5), 1 - x, x)


@OBJECTIVES.register("byol")
class BYOL(Objective):
    """Args:
    proj_hidden: hidden width of the projector and the predictor (4096 in the paper).
    proj_dim: output width of both (256 in the paper).
    tau_base: the target's momentum at the first step (0.996 in the paper for 1000 ImageNet
        epochs; 0.99 suits runs of a few thousand steps).
    momentum_steps: K of the cosine schedule; default (null): the run's ``optim.steps``, which the
        framework passes as ``total_steps``. From step K on the target stays fixed (τ = 1).
    crop_scale, crop_ratio, flip_prob: the random resized crop and flip of both views.
    color_strength: s of ColorJitter(0.8s, 0.8s, 0.4s, 0.2s) (the paper's 0.4, 0.4, 0.2, 0.1 at
        s = 0.5); on grey images only brightness and contrast apply.
    jitter_prob: probability of colour jitter (0.8).
    grayscale_prob: probability of converting an RGB view to grey (0.2).
    blur_prob: Gaussian blur probability of view 1 and view 2 (asymmetric: 1.0 and 0.1).
    blur_sigma: blur σ range in pixels of the view.
    solarize_prob: solarisation probability of view 1 and view 2 (0.0 and 0.2).
    predictor_lr_scale: the predictor trains at this multiple of the scheduled learning rate (1 in
        the paper; Tian et al., 2021 study the predictor's relative learning rate). On MNIST with a
        ResNet-18 ×0.25, 1000 steps, 10 lifted kNN from 60.0 to 77.9 % (README, Numbers).
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = 0,
        proj_hidden: Annotated[int, Field(ge=1)] = 1024,
        proj_dim: Annotated[int, Field(ge=1)] = 256,
        tau_base: Fraction = 0.99,
        momentum_steps: Annotated[int, Field(ge=1)] | None = None,
        total_steps: int = 1000,
        crop_scale: tuple[Fraction, Fraction] = (0.08, 1.0),
        crop_ratio: tuple[Positive, Positive] = (3 / 4, 4 / 3),
        flip_prob: Fraction = 0.5,
        color_strength: Annotated[float, Field(ge=0)] = 0.5,
        jitter_prob: Fraction = 0.8,
        grayscale_prob: Fraction = 0.2,
        blur_prob: tuple[Fraction, Fraction] = (1.0, 0.1),
        blur_sigma: tuple[Positive, Positive] = (0.1, 2.0),
        solarize_prob: tuple[Fraction, Fraction] = (0.0, 0.2),
        predictor_lr_scale: Positive = 1.0,
    ):
        super().__init__(backbone)
        if not 0 < crop_scale[0] <= crop_scale[1]:
            raise ValueError(f"objective.crop_scale={list(crop_scale)}: need 0 < min <= max <= 1")
        if blur_sigma[0] > blur_sigma[1]:
            raise ValueError(f"objective.blur_sigma={list(blur_sigma)}: need min <= max")
        self.projector = ProjectionHead(backbone.feature_dim, proj_hidden, proj_dim)
        self.predictor = ProjectionHead(proj_dim, proj_hidden, proj_dim)
        # the target network: a copy of the online backbone and projector, moved only by after_step
        self.target = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "projector": copy.deepcopy(self.projector)})
        self.target.requires_grad_(False)
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))  # EMA updates taken so far
        self.tau_base, self.momentum_steps = tau_base, momentum_steps or total_steps
        self.crop_scale, self.crop_ratio, self.flip_prob = tuple(crop_scale), tuple(crop_ratio), flip_prob
        s = color_strength
        self.jitter = {"brightness": 0.8 * s, "contrast": 0.8 * s, "saturation": 0.4 * s, "hue": 0.2 * s,
                       "p": jitter_prob}
        self.grayscale_prob, self.blur_prob, self.solarize_prob = grayscale_prob, tuple(blur_prob), tuple(solarize_prob)
        self.blur_sigma = tuple(blur_sigma)
        self.predictor_lr_scale = predictor_lr_scale
        radius = min(math.ceil(2 * blur_sigma[1]), (backbone.image_size - 1) // 2)
        self.blur_kernel = 2 * radius + 1

    def setup(self, dataset: ImageDataset) -> None:
        """Start the target equal to the online network, after any data-dependent state of the
        backbone has been fitted (a resumed run then loads both from its checkpoint)."""
        super().setup(dataset)
        self.target["backbone"].load_state_dict(self.backbone.state_dict())
        self.target["projector"].load_state_dict(self.projector.state_dict())

    def lr_scales(self) -> dict[str, float]:
        return {"predictor.": self.predictor_lr_scale} if self.predictor_lr_scale != 1 else {}

    # -- views ------------------------------------------------------------------------------------

    def augment(self, x: torch.Tensor, generator: torch.Generator, view: int) -> torch.Tensor:
        """View ``view`` (0 or 1: their blur and solarisation probabilities differ) of a ``[0, 1]``
        batch ``(B, C, H, W)`` → normalised ``(B, C, S, S)``."""
        x = augment.random_resized_crop(x, self.backbone.image_size, generator, self.crop_scale,
                                        self.crop_ratio, self.flip_prob)
        x = augment.color_jitter(x, generator, **self.jitter)
        x = augment.random_grayscale(x, generator, self.grayscale_prob)
        if self.blur_prob[view] > 0:
            x = augment.gaussian_blur(x, generator, self.blur_kernel, self.blur_sigma, self.blur_prob[view])
        if self.solarize_prob[view] > 0:
            x = solarize(x, generator, self.solarize_prob[view])
        return (x - MEAN) / STD

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """uint8 ``(B, C, H, W)`` → two augmented views ``(B, in_chans, S, S)`` (grey data stays grey
        while augmented, then is repeated to the backbone's channels)."""
        c = self.backbone.in_chans
        grey = images.shape[1] == 1
        x = to_input(images, images.shape[-1], 1 if grey else c) * STD + MEAN  # [0, 1], native size
        views = [self.augment(x, generator, i) for i in range(2)]
        return [v.expand(-1, c, -1, -1).contiguous() if v.shape[1] != c else v for v in views]

    # -- loss and target --------------------------------------------------------------------------

    def momentum(self, step: int) -> float:
        """τ of the EMA update after optimizer step ``step`` (0-based)."""
        return target_momentum(step, self.momentum_steps, self.tau_base)

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """views: two ``(B, C, H, W)`` batches → the symmetrised loss, and the τ the target will
        move with after this step (``momentum``)."""
        x = torch.cat(views)
        p1, p2 = self.predictor(self.projector(self.backbone(x))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target["projector"](self.target["backbone"](x)).chunk(2)
        loss = byol_loss(p1, p2, z1, z2)
        k = self.ema_steps.clamp(max=self.momentum_steps).float()  # on the device: no host sync
        tau = 1 - (1 - self.tau_base) * (torch.cos(math.pi * k / self.momentum_steps) + 1) / 2
        return {"loss": loss, "momentum": tau}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """The target moves towards the online weights: ``ξ ← τ ξ + (1 - τ) θ`` for every parameter
        of the backbone and the projector, with ``τ = momentum(step)``. (BatchNorm running
        statistics of the target are its own, from its forward passes.)"""
        tau = self.momentum(step)
        online = [*self.backbone.parameters(), *self.projector.parameters()]
        target = [*self.target["backbone"].parameters(), *self.target["projector"].parameters()]
        for t, s in zip(target, online, strict=True):
            t.mul_(tau).add_(s.detach(), alpha=1 - tau)
        self.ema_steps.fill_(step + 1)
