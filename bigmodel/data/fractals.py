"""FractalDB-style images from iterated function systems (Kataoka et al., ACCV 2020,
"Pre-training without Natural Images"; sampling after Anderson & Farrell, WACV 2022).

Each class is one random IFS: 2-4 contractive affine maps ``x -> A_k x + b_k`` whose singular
values satisfy a σ-factor constraint, so the attractor is neither a dot nor a smear. An image of
the class renders the attractor of a slightly perturbed copy of the system with the chaos game,
at a random scale, offset and flip, as a log-density picture. Everything derives from
``(seed, class, split)``: the same seed gives the same images in any access order, and images
are rendered one class at a time, on first use, then kept in memory.
"""

from __future__ import annotations

import threading
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from bigmodel.data.base import ImageDataset
from bigmodel.registry import DATASETS

_SPLIT_STREAM = {"train": 1, "test": 2}


def sample_system(rng: np.random.Generator, min_fill: float = 0.08) -> tuple[np.ndarray, np.ndarray]:
    """A random IFS ``(A (n, 2, 2), b (n, 2))`` whose rendered attractor fills ≥ ``min_fill``."""
    while True:
        n = int(rng.integers(2, 5))
        # σ-factor: Σ_k (σ1_k + 2 σ2_k) in [(5 + n) / 2, (6 + n) / 2]  (Anderson & Farrell)
        alpha = rng.uniform((5 + n) / 2, (6 + n) / 2)
        raw = rng.uniform(0.2, 1.0, size=(n, 2))
        raw.sort(axis=1)
        s2, s1 = raw[:, 0], raw[:, 1]
        scale = alpha / (s1 + 2 * s2).sum()
        s1, s2 = s1 * scale, s2 * scale
        if (s1 >= 1).any():
            continue
        theta, phi = rng.uniform(0, 2 * np.pi, size=(2, n))
        flip = rng.choice([-1.0, 1.0], size=(n, 2))
        A = _rot(theta) @ (np.stack([s1, s2], -1)[..., None] * np.eye(2)) @ _rot(phi)
        A = A * flip[:, None, :]
        b = rng.uniform(-1, 1, size=(n, 2))
        probe = render(A[None], b[None], 24, rng, points=3000)
        if (probe > 0).mean() >= min_fill:
            return A, b


def _rot(angle: np.ndarray) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def render(A: np.ndarray, b: np.ndarray, size: int, rng: np.random.Generator, points: int = 8000,
           jitter: bool = False) -> np.ndarray:
    """Chaos-game rendering of a batch of systems: ``A (B, n, 2, 2)``, ``b (B, n, 2)`` → uint8 ``(B, size, size)``.

    Maps are drawn with probability ∝ |det A_k| (FractalDB). 64 chains per image run in parallel,
    vectorised over the whole batch; the first 16 steps are discarded.
    """
    batch, n = A.shape[:2]
    chains, burn = 64, 16
    steps = burn + max(1, points // chains)
    det = np.abs(np.linalg.det(A)) + 1e-3
    cum = np.cumsum(det / det.sum(1, keepdims=True), axis=1)
    x = rng.uniform(-0.5, 0.5, size=(batch, chains, 2))
    out = np.empty((batch, chains, steps - burn, 2))
    rows = np.arange(batch)[:, None]
    # Inverse-CDF draw of every map index at once: offset each image's CDF by its row number so
    # that one searchsorted over the flattened, still sorted, CDFs serves the whole batch.
    u = rng.random((batch, chains * steps)) + rows
    ks = np.searchsorted((cum + rows).ravel(), u.ravel()).reshape(batch, chains, steps) - rows[..., None] * n
    ks = ks.clip(0, n - 1)
    for t in range(steps):
        k = ks[..., t]
        a, t_ = A[rows, k], b[rows, k]  # (B, chains, 2, 2), (B, chains, 2)
        x = np.stack([a[..., 0, 0] * x[..., 0] + a[..., 0, 1] * x[..., 1],
                      a[..., 1, 0] * x[..., 0] + a[..., 1, 1] * x[..., 1]], -1) + t_
        if t >= burn:
            out[:, :, t - burn] = x
    pts = out.reshape(batch, -1, 2)
    lo, hi = pts.min(1, keepdims=True), pts.max(1, keepdims=True)
    span = (hi - lo).max(-1, keepdims=True) + 1e-9
    if jitter:  # random scale and offset inside the frame
        fill = rng.uniform(0.7, 1.0, size=(batch, 1, 1))
        offset = rng.uniform(0, 1 - fill, size=(batch, 1, 2))
    else:
        fill, offset = np.full((batch, 1, 1), 0.95), np.full((batch, 1, 2), 0.025)
    uv = ((pts - lo) / span * fill + offset) * (size - 1)
    ij = np.clip(np.round(uv).astype(np.int64), 0, size - 1)
    flat = rows * size * size + ij[..., 1] * size + ij[..., 0]
    counts = np.bincount(flat.ravel(), minlength=batch * size * size).reshape(batch, size, size)
    dens = np.log1p(counts) / np.log1p(counts.reshape(batch, -1).max(1))[:, None, None]
    return np.round(dens * 255).astype(np.uint8)


@DATASETS.register("fractals")
class Fractals(ImageDataset):
    """Procedural FractalDB-style classification data, generated on the fly.

    Args:
        classes: number of classes (one IFS each).
        images_per_class: images of each class in this split.
        image_size: side in pixels.
        channels: 1 (grey) or 3 (each image gets a random colour, unrelated to its class).
        seed: the systems and images derive from it.
        perturb: relative perturbation of the maps between images of a class.
        points: chaos-game points per image.
        flip: random horizontal and vertical flips of the attractor (FractalDB's augmentation);
            turn off when the downstream task is not flip-invariant (digits: 6 vs 9).
    """

    def __init__(
        self,
        classes: Annotated[int, Field(ge=2)] = 64,
        images_per_class: Annotated[int, Field(ge=1)] = 200,
        image_size: Annotated[int, Field(ge=8, le=512)] = 32,
        channels: Literal[1, 3] = 1,
        seed: int = 0,
        perturb: Annotated[float, Field(ge=0, le=0.5)] = 0.08,
        points: Annotated[int, Field(ge=500)] = 6000,
        flip: bool = True,
        split: Literal["train", "test"] = "train",
    ):
        self.num_classes = classes
        self.per_class = images_per_class
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self.perturb = perturb
        self.points = points
        self.flip = flip
        self.split = split
        self.classes = [f"ifs{c}" for c in range(classes)]
        self._cache: dict[int, torch.Tensor] = {}
        self._lock = threading.Lock()

    def system(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        return sample_system(np.random.default_rng([self.seed, c, 0]))

    def render_class(self, c: int) -> torch.Tensor:
        """All images of class ``c`` in this split: uint8 ``(images_per_class, C, H, W)``."""
        rng = np.random.default_rng([self.seed, c, _SPLIT_STREAM[self.split]])
        A, b = self.system(c)
        m = self.per_class
        A = A[None] * (1 + rng.uniform(-self.perturb, self.perturb, size=(m, *A.shape)))
        b = b[None] * (1 + rng.uniform(-self.perturb, self.perturb, size=(m, *b.shape)))
        A = A / np.maximum(1.0, np.linalg.norm(A, ord=2, axis=(-2, -1)) / 0.98)[..., None, None]
        img = render(A, b, self.image_size, rng, self.points, jitter=True)
        flips = (rng.random((m, 2)) < 0.5) & self.flip
        img[flips[:, 0]] = img[flips[:, 0], :, ::-1]
        img[flips[:, 1]] = img[flips[:, 1], ::-1, :]
        img = img[:, None].astype(np.float32)
        if self.channels == 3:
            img = img * rng.uniform(0.35, 1.0, size=(m, 3, 1, 1))
        return torch.from_numpy(np.round(img).astype(np.uint8))

    def _class_images(self, c: int) -> torch.Tensor:
        with self._lock:
            if c not in self._cache:
                self._cache[c] = self.render_class(c)
            return self._cache[c]

    def __len__(self) -> int:
        return self.num_classes * self.per_class

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        c, j = divmod(int(i), self.per_class)
        return self._class_images(c)[j], c

    def labels(self) -> torch.Tensor:
        return torch.arange(self.num_classes).repeat_interleave(self.per_class)
