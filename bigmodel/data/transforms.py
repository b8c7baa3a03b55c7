"""Batched image transforms on uint8 tensors (DESIGN.md §9: augment batches, not PIL images).

Every random transform takes an explicit ``torch.Generator`` so that a training step's views are a
pure function of ``(seed, step)``: this is what makes resumed runs bit-identical.
"""

from __future__ import annotations

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


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random ``size²`` crops of a float batch ``(B, C, H, W)`` (torchvision's
    ``RandomCrop``, vectorised: one offset pair per image, drawn rows first, on the CPU's generator
    whatever ``x``'s device)."""
    b, c, h, w = x.shape
    dy = torch.randint(0, h - size + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, w - size + 1, (b,), generator=generator).to(x.device)
    ar = torch.arange(size, device=x.device)
    x = x.gather(2, (dy[:, None] + ar)[:, None, :, None].expand(b, c, size, w))
    return x.gather(3, (dx[:, None] + ar)[:, None, None, :].expand(b, c, size, size))


def random_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Per-sample random translation (pad-and-crop, reflect padding) and horizontal flip of a float batch."""
    if pad > 0:
        x = random_crop(F.pad(x, (pad, pad, pad, pad), mode="reflect"), x.shape[-1], generator)
    if flip:
        mask = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x
