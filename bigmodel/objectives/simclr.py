"""SimCLR (Chen et al., 2020, arXiv:2002.05709): contrastive learning of visual representations.

Two augmented views of every image pass through the backbone and a 2-layer MLP projection head;
the NT-Xent loss pulls each view's projection towards its partner's and away from the other
``2N - 2`` views of the batch. The transfer protocols use the backbone's pooled features, before
the projection head, as in the paper.

With several processes the batch is the global one, as in the paper (§B.1 "global BN", and the
negatives of all cores): each rank gathers the projections of every rank, with gradients, and
the projection head's BatchNorm normalises with statistics over every rank's rows, so the loss
and its gradient are those of one process holding the whole batch
(:func:`bigmodel.collectives.gather`).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bigmodel import collectives
from bigmodel.architectures.base import Backbone
from bigmodel.data import augment
from bigmodel.data.transforms import MEAN, STD, to_input
from bigmodel.objectives.base import Objective
from bigmodel.registry import OBJECTIVES

Fraction = Annotated[float, Field(ge=0, le=1)]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Normalised temperature-scaled cross-entropy over the ``2N`` views (SimCLR eq. 1).

    Args:
        z1, z2: projections ``(N, D)`` of the two views; row ``i`` of each is the same image.
        temperature: τ dividing the cosine similarities.

    Returns:
        The mean over all ``2N`` anchors of ``-log softmax`` of the positive's similarity among
        the ``2N - 1`` other views.
    """
    n = len(z1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = (z @ z.T) / temperature  # (2N, 2N)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, positives)


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics are those of the global batch when ranks train
    together (SimCLR's global BN): the sums behind the mean and the variance are all-reduced with
    gradients. In one process, and outside training, it is ``BatchNorm1d`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and collectives.gathering()):
            return super().forward(x)
        xf = x.float()
        n = len(x) * collectives.world()  # every rank holds the same number of rows
        mean = collectives.all_reduce_sum(xf.sum(0)) / n
        var = collectives.all_reduce_sum((xf - mean).pow(2).sum(0)) / n
        if self.track_running_stats:
            self._track(mean.detach(), var.detach(), n)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        return (y * self.weight + self.bias if self.affine else y).to(x.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        """Update the running statistics as ``F.batch_norm`` does (the unbiased variance)."""
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean, m)
        self.running_var.lerp_(var * n / max(n - 1, 1), m)


class ProjectionHead(nn.Sequential):
    """SimCLR's projector: Linear → BatchNorm (optional) → ReLU → Linear, ``(B, D)`` → ``(B, out_dim)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True):
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=not batch_norm),
            GlobalBatchNorm1d(hidden_dim) if batch_norm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


@OBJECTIVES.register("simclr")
class SimCLR(Objective):
    """Args:
    temperature: τ of NT-Xent (0.5 is usual with small batches; the paper takes 0.1 with 4096).
    proj_hidden: hidden width of the projection head.
    proj_dim: output width of the projection head (128 in the paper).
    proj_bn: BatchNorm after the hidden layer (as in SimCLR; statistics over both views).
    crop_scale: area fraction range of the random resized crop (0.08-1 on ImageNet; larger
        minimums suit small digits).
    crop_ratio: aspect-ratio range of the crop.
    flip_prob: probability of a horizontal flip.
    color_strength: s of ColorJitter(0.8s, 0.8s, 0.8s, 0.2s); on grey images only brightness
        and contrast apply.
    jitter_prob: probability of colour jitter (0.8 in the paper).
    grayscale_prob: probability of converting an RGB view to grey (0.2; no-op on grey data).
    blur_prob: probability of Gaussian blur (0.5 on ImageNet; the paper omits it on CIFAR).
    blur_sigma: blur σ range in pixels of the view (torchvision's 0.1-2); the kernel spans
        ±2σ_max.
    """

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = 0,
        temperature: Annotated[float, Field(gt=0)] = 0.5,
        proj_hidden: Annotated[int, Field(ge=1)] = 512,
        proj_dim: Annotated[int, Field(ge=1)] = 128,
        proj_bn: bool = True,
        crop_scale: tuple[Fraction, Fraction] = (0.08, 1.0),
        crop_ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (3 / 4, 4 / 3),
        flip_prob: Fraction = 0.5,
        color_strength: Annotated[float, Field(ge=0)] = 0.5,
        jitter_prob: Fraction = 0.8,
        grayscale_prob: Fraction = 0.2,
        blur_prob: Fraction = 0.5,
        blur_sigma: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = (0.1, 2.0),
    ):
        super().__init__(backbone)
        if not 0 < crop_scale[0] <= crop_scale[1]:
            raise ValueError(f"objective.crop_scale={list(crop_scale)}: need 0 < min <= max <= 1")
        self.head = ProjectionHead(backbone.feature_dim, proj_hidden, proj_dim, proj_bn)
        self.temperature = temperature
        self.crop_scale, self.crop_ratio, self.flip_prob = tuple(crop_scale), tuple(crop_ratio), flip_prob
        s = color_strength
        self.jitter = {"brightness": 0.8 * s, "contrast": 0.8 * s, "saturation": 0.8 * s, "hue": 0.2 * s,
                       "p": jitter_prob}
        self.grayscale_prob, self.blur_prob = grayscale_prob, blur_prob
        if blur_sigma[0] > blur_sigma[1]:
            raise ValueError(f"objective.blur_sigma={list(blur_sigma)}: need min <= max")
        self.blur_sigma = tuple(blur_sigma)
        radius = min(math.ceil(2 * blur_sigma[1]), (backbone.image_size - 1) // 2)
        self.blur_kernel = 2 * radius + 1

    def augment(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One SimCLR view of a ``[0, 1]`` batch ``(B, C, H, W)`` → normalised ``(B, C, S, S)``."""
        x = augment.random_resized_crop(x, self.backbone.image_size, generator, self.crop_scale,
                                        self.crop_ratio, self.flip_prob)
        x = augment.color_jitter(x, generator, **self.jitter)
        x = augment.random_grayscale(x, generator, self.grayscale_prob)
        if self.blur_prob > 0:
            x = augment.gaussian_blur(x, generator, self.blur_kernel, self.blur_sigma, self.blur_prob)
        return (x - MEAN) / STD

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """uint8 ``(B, C, H, W)`` → two independently augmented views ``(B, in_chans, S, S)``."""
        c = self.backbone.in_chans
        grey = images.shape[1] == 1  # grey data stays grey while augmented: no colour to jitter
        x = to_input(images, images.shape[-1], 1 if grey else c) * STD + MEAN  # [0, 1], native size
        views = [self.augment(x, generator) for _ in range(2)]
        return [v.expand(-1, c, -1, -1).contiguous() if v.shape[1] != c else v for v in views]

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """views: two ``(B, C, H, W)`` batches → NT-Xent loss and the positive's top-1 rate, over the
        global batch when ranks train together (the projections of every rank gathered)."""
        z1, z2 = self.head(self.backbone(torch.cat(views))).chunk(2)
        z1, z2 = collectives.gather(z1), collectives.gather(z2)
        loss = nt_xent(z1, z2, self.temperature)
        with torch.no_grad():
            z = F.normalize(torch.cat([z1, z2]), dim=1)
            sim = (z @ z.T).fill_diagonal_(-2.0)
            n = len(z1)
            partner = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
            acc = (sim.argmax(1) == partner).float().mean()
        return {"loss": loss, "pos_top1": acc}
