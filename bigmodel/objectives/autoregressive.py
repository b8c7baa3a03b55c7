"""Autoregressive next-pixel prediction (ImageGPT: Chen et al., 2020; PixelRNN: van den Oord et
al., 2016).

The backbone is a :class:`~bigmodel.architectures.sequence.SequenceModel` (``igpt``, or ``lstm``
with ``causal: true, patch_size: 1``): it quantises an image to the raster sequence of its
palette indices (``tokens``) and returns, for every position t, a hidden state that has seen
only tokens < t (``forward_tokens``). This objective owns the linear head to colour logits and
the loss: cross-entropy of token t given tokens < t, averaged over all positions.

``setup`` fits the palette (k-means over pixels of the pretraining data, at the backbone's
resolution) before training; it is stored in the backbone's buffers, so checkpoints carry it.
In-memory data gives a seeded random draw of images; a stream (``shards``) gives the images of
its first batches as one process reads them with seed ``palette_seed`` (deterministic, the
same on every rank, and spread over every stream's range of the corpus).
``sample`` draws new images and ``complete`` fills in the lower half of given ones.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bigmodel.architectures.base import CAUSAL
from bigmodel.architectures.sequence import SequenceModel
from bigmodel.data.base import ImageDataset
from bigmodel.objectives.base import Objective
from bigmodel.registry import OBJECTIVES


def palette_sample(dataset: ImageDataset, n: int, seed: int) -> torch.Tensor:
    """uint8 ``(min(n, len), C, H, W)`` images to fit a palette on: a seeded random draw from a
    map-style dataset, or the first batches of a stream, which cannot be indexed: those rank 0 of
    a one-process run reads with seed ``seed``, so every rank of a distributed run fits the same
    palette."""
    n = min(n, len(dataset))
    if hasattr(dataset, "step_batches"):  # streamed: read, never index
        batch = min(n, 256)
        out, got = [], 0
        for images, _ in dataset.step_batches(range(-(-n // batch)), batch, seed, rank=0, world=1):
            out.append(images[: n - got])
            got += len(out[-1])
        return torch.cat(out)
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    images = getattr(dataset, "images", None)
    return images[idx] if images is not None else torch.stack([dataset[int(i)][0] for i in idx])


def next_pixel_head(backbone: SequenceModel) -> nn.Linear:
    """A new linear head from a position's hidden state to colour logits (normal(0.02) weights, zero bias)."""
    head = nn.Linear(backbone.token_dim, backbone.vocab_size)
    nn.init.zeros_(head.bias)
    nn.init.normal_(head.weight, std=0.02)
    return head


def next_pixel_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy (nats per token) of ``(B, T, vocab)`` logits against ``(B, T)`` tokens, in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())


@OBJECTIVES.register("autoregressive")
class Autoregressive(Objective):
    """Args:
    palette_images: images of the pretraining set whose pixels fit the palette.
    palette_seed: seed of the image draw and of k-means.
    """

    requires = frozenset({CAUSAL})
    backbone: SequenceModel

    def __init__(
        self,
        backbone: SequenceModel,
        num_classes: int = 0,
        palette_images: Annotated[int, Field(ge=1)] = 2000,
        palette_seed: int = 0,
    ):
        super().__init__(backbone)
        self.palette_images, self.palette_seed = palette_images, palette_seed
        self.head = next_pixel_head(backbone)

    def setup(self, dataset: ImageDataset) -> None:
        """Fit the backbone's palette to pixels of ``palette_images`` training images."""
        x = self.to_input(palette_sample(dataset, self.palette_images, self.palette_seed))
        self.backbone.palette.fit(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), seed=self.palette_seed)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` tokens → ``(B, T, vocab)`` logits of each token given the ones before it."""
        return self.head(self.backbone.forward_tokens(tokens))

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """views: ``[(B, C, H, W)]`` → loss (nats per token), bits per token and next-token accuracy."""
        tokens = self.backbone.tokens(views[0])
        logits = self.logits(tokens)
        loss = next_pixel_loss(logits, tokens)
        acc = (logits.argmax(-1) == tokens).float().mean()
        return {"loss": loss, "bits_per_token": loss.detach() / math.log(2), "acc": acc}

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, start: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample positions ``start … T-1`` of ``(B, T)`` tokens in raster order, in eval mode."""
        was_training = self.training
        self.eval()
        tokens = tokens.clone()
        for t in range(start, tokens.shape[1]):
            # Causal: the hidden state at t depends only on tokens < t, so a prefix of t + 1 suffices.
            logits = self.logits(tokens[:, : t + 1])[:, t].float() / temperature
            probs = logits.softmax(-1)
            tokens[:, t] = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(tokens.device)
        self.train(was_training)
        return tokens

    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` new images ``(n, C, H, W)`` in normalised input space (palette colours)."""
        dev = self.head.weight.device
        tokens = torch.zeros(n, self.backbone.seq_len, dtype=torch.long, device=dev)
        return self.backbone.decode(self.generate(tokens, 0, temperature, generator))

    def complete(self, images: torch.Tensor, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Keep the upper half (rows ``< H // 2``) of each image and sample the lower half.

        Args:
            images: uint8 ``(B, C, H, W)`` (normalised here) or normalised float inputs at the
                backbone's size.

        Returns:
            ``(B, C, H, W)`` in normalised input space (palette colours).
        """
        x = self.to_input(images) if images.dtype == torch.uint8 else images
        side = self.backbone.image_size
        tokens = self.backbone.tokens(x.to(self.head.weight.device))
        return self.backbone.decode(self.generate(tokens, (side // 2) * side, temperature, generator))
