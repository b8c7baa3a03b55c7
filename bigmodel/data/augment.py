"""Batched, per-sample random augmentations of float images in ``[0, 1]`` (DESIGN.md §9).

Each function draws one set of parameters per image from an explicit ``torch.Generator`` and
transforms the whole batch with a few tensor ops (one ``grid_sample`` for every crop, one grouped
convolution for every blur), instead of looping over PIL images. The same generator state gives
the same outputs, which keeps training steps a pure function of ``(seed, step)``.

These are the augmentations of SimCLR (Chen et al., 2020, arXiv:2002.05709, appendix A), written
to match torchvision's ``RandomResizedCrop``, ``ColorJitter``, ``RandomGrayscale`` and
``GaussianBlur`` in distribution, with two simplifications noted where they occur (colour jitter).
:func:`random_resized_crop` is the framework's only resized crop (objectives, benchmarks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def random_resized_crop_boxes(b: int, h: int, w: int, generator: torch.Generator,
                              scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                              tries: int = 10) -> tuple[torch.Tensor, ...]:
    """Crop boxes of torchvision's ``RandomResizedCrop.get_params``, ``b`` at once, in pixels.

    Per box: an area ``~U(scale) · h · w`` and an aspect ratio ``~logU(ratio)``, redrawn up to
    ``tries`` times until the box fits in the image, at a uniform position; the whole image when
    no try fits (torchvision then centre-crops to the nearest allowed ratio: the same for square
    images). Boxes are continuous (torchvision rounds the sides to whole pixels).

    Returns:
        ``(x0, y0, cw, ch)``, each ``(b,)`` float: left, top, width and height.
    """
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
    return x0, y0, cw, ch


def random_resized_crop(x: torch.Tensor, size: int, generator: torch.Generator,
                        scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                        flip_prob: float = 0.0, tries: int = 10) -> torch.Tensor:
    """Inception-style random resized crop (and horizontal flip) of a float batch, vectorised: the
    one crop of the framework, matching torchvision's ``RandomResizedCrop`` in distribution.

    Boxes come from :func:`random_resized_crop_boxes`; each is resized to ``size`` (bilinear) and
    mirrored with probability ``flip_prob``, all by one ``grid_sample`` (the flip folded into the
    sampling grid). No antialiasing: crops much larger than ``size`` alias slightly.

    Args:
        x: ``(B, C, H, W)`` float.
        size: output side.
    Returns:
        ``(B, C, size, size)``.
    """
    b, c, h, w = x.shape
    x0, y0, cw, ch = random_resized_crop_boxes(b, h, w, generator, scale, ratio, tries)
    sx = cw / w
    if flip_prob > 0:
        sx = torch.where(torch.rand(b, generator=generator) < flip_prob, -sx, sx)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx, (2 * x0 + cw) / w - 1  # output [-1, 1] → the box, in input coords
    theta[:, 1, 1], theta[:, 1, 2] = ch / h, (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` → luma ``(B, 1, H, W)``; a 1-channel image is returned as is."""
    if x.shape[1] == 1:
        return x
    return (x * x.new_tensor(GREY)[None, :, None, None]).sum(1, keepdim=True)


def _hue_rotate(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of RGB images by ``turns`` (fractions of a full turn, one per image).

    A rotation of the chroma plane in YIQ space: a linear, vectorised stand-in for torchvision's
    HSV hue shift (the same for greys and very close for saturated colours)."""
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    from_yiq = torch.linalg.inv(to_yiq)
    cos, sin = torch.cos(2 * math.pi * turns), torch.sin(2 * math.pi * turns)
    rot = torch.zeros(len(turns), 3, 3, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    m = from_yiq @ rot.to(x.device) @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x)


def color_jitter(x: torch.Tensor, generator: torch.Generator, brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4, hue: float = 0.1, p: float = 0.8) -> torch.Tensor:
    """With probability ``p`` per image, scale brightness, contrast and saturation by factors
    ``~U(1 ± strength)`` and rotate the hue by ``~U(±hue)`` turns.

    Saturation and hue apply to RGB images only; on grey images jitter is brightness and
    contrast. torchvision applies the four in a random order; here the order is fixed.
    """
    b, c = x.shape[:2]
    on = (torch.rand(b, generator=generator) < p).to(x)

    def factor(strength: float) -> torch.Tensor:  # 1 where jitter is off
        f = _uniform(b, max(0.0, 1 - strength), 1 + strength, generator).to(x)
        return (1 + on * (f - 1))[:, None, None, None]

    x = (x * factor(brightness)).clamp(0, 1)
    mean = grayscale(x).mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * factor(contrast) + mean).clamp(0, 1)
    if c == 3:
        grey = grayscale(x)
        x = ((x - grey) * factor(saturation) + grey).clamp(0, 1)
        turns = _uniform(b, -hue, hue, generator).to(x) * on
        x = _hue_rotate(x, turns).clamp(0, 1)
    return x


def random_grayscale(x: torch.Tensor, generator: torch.Generator, p: float = 0.2) -> torch.Tensor:
    """Replace RGB images by their luma (repeated to 3 channels) with probability ``p`` each."""
    if x.shape[1] == 1:
        return x
    on = torch.rand(x.shape[0], generator=generator) < p
    return torch.where(on.to(x.device)[:, None, None, None], grayscale(x).expand_as(x), x)


def gaussian_blur(x: torch.Tensor, generator: torch.Generator, kernel_size: int,
                  sigma: tuple[float, float] = (0.1, 2.0), p: float = 0.5) -> torch.Tensor:
    """Blur each image with probability ``p`` by a Gaussian of ``sigma ~ U(sigma)`` pixels
    (separable, ``kernel_size`` taps, reflect padding). One grouped convolution per axis."""
    b, c, h, w = x.shape
    on = torch.rand(b, generator=generator) < p
    s = _uniform(b, *sigma, generator)
    r = kernel_size // 2
    taps = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-taps[None] ** 2 / (2 * s[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)
    delta = (taps == 0).float()[None].expand(b, -1)
    k = torch.where(on[:, None], k, delta).to(x)  # (B, K); identity kernel where blur is off
    k = k.repeat_interleave(c, 0)  # (B·C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k[:, None, :, None], groups=b * c)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    return y.reshape(b, c, h, w)
