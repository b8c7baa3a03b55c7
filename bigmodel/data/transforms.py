"""Batched image transforms on uint8 tensors (DESIGN.md §9: augment batches, not PIL images).

Every random transform takes an explicit ``torch.Generator`` so that a training step's views are a
pure function of ``(seed, step)``: this is what makes resumed runs bit-identical.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

MEAN, STD = 0.5, 0.5


def to_input(images: torch.Tensor, image_size: int, in_chans: int) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` → float ``(B, in_chans, image_size, image_size)`` normalised to ≈[-1, 1].

    Grey inputs are repeated to 3 channels, RGB inputs averaged to 1; sizes are matched with
    bilinear (antialiased when shrinking) resizing.
    """
    x = images.float().div_(255.0)
    c = x.shape[1]
    if c != in_chans:
        if c == 1:
            x = x.expand(-1, in_chans, -1, -1)
        elif in_chans == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise ValueError(f"cannot map {c}-channel images to a {in_chans}-channel backbone")
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        shrink = x.shape[-1] > image_size
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=shrink)
    return (x - MEAN) / STD


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Per-sample random translation (pad-and-crop, reflect padding) and horizontal flip of a float batch."""
    b, _, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(b, x.shape[1], h, w + 2 * pad)
        x = padded.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(b, x.shape[1], h, w)
        x = x.gather(3, cols)
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, size: int,
                        scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip: bool = True, tries: int = 10) -> torch.Tensor:
    """Inception-style random resized crop (and horizontal flip) of a float batch, vectorised.

    Per sample: an area fraction from ``scale`` and a log-uniform aspect ratio from ``ratio``,
    redrawn up to ``tries`` times until the box fits (as torchvision's ``RandomResizedCrop``; the
    whole image when none does), a uniform position, then one bilinear ``grid_sample`` for the
    whole batch. Boxes are continuous (sub-pixel), and a flip is folded into the same sampling
    grid. No antialiasing: crops much larger than ``size`` alias slightly.

    Args:
        x: ``(B, C, H, W)`` float.
        size: output side.
    Returns:
        ``(B, C, size, size)``.
    """
    b, c, h, w = x.shape
    area = torch.empty(b, tries).uniform_(scale[0], scale[1], generator=generator) * (h * w)
    log_r = torch.empty(b, tries).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    cw, ch = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()
    fits = (cw <= w) & (ch <= h)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits
    found = fits.any(1)
    cw = torch.where(found, cw.gather(1, first).squeeze(1), torch.tensor(float(w)))
    ch = torch.where(found, ch.gather(1, first).squeeze(1), torch.tensor(float(h)))
    x0 = torch.rand(b, generator=generator) * (w - cw)
    y0 = torch.rand(b, generator=generator) * (h - ch)
    sx = cw / w
    if flip:
        sx = torch.where(torch.rand(b, generator=generator) < 0.5, -sx, sx)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * x0 + cw) / w - 1  # output [-1, 1] → the box, in input coords
    theta[:, 1, 1], theta[:, 1, 2] = ch / h, (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
