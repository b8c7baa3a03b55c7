"""ImageGPT (Chen et al., 2020, "Generative Pretraining from Pixels").

A decoder-only transformer over the raster sequence of colour-cluster tokens: token and position
embeddings, a learned start token in front (the sequence is shifted right by one), pre-norm
blocks with GELU MLPs (timm's ``Block``) whose attention is SDPA with ``is_causal=True`` — no
mask is ever materialised — and a final LayerNorm. The palette (k-means colours, see
:mod:`bigmodel.architectures.sequence`) is a buffer, saved and restored with the weights.

Features for transfer (``forward``): the image is quantised to the palette inside the backbone,
run through the first ``feature_layer`` blocks, layer-normalised (no affine) and averaged over
positions. iGPT found linear probes best on middle layers of its generative models, so
``feature_layer`` defaults to the middle block (``depth // 2``); ``feature_layer = depth`` probes
the final layer.
"""

from __future__ import annotations

from typing import Annotated, Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError, model_validator
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from bigmodel.architectures.base import CAUSAL
from bigmodel.architectures.sequence import Palette, SequenceModel
from bigmodel.architectures.vit import Attention
from bigmodel.registry import ARCHITECTURES

# width, depth, heads: CPU-sized members of the family (iGPT-S is 512, 24, 8).
SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (64, 4, 4),
    "small": (128, 6, 4),
}


class Size(BaseModel):
    """A size given by its numbers (``architecture.size: {width: 512, depth: 24, heads: 8}`` is iGPT-S)."""

    model_config = ConfigDict(extra="forbid")

    width: Annotated[int, Field(ge=1)]
    depth: Annotated[int, Field(ge=1)]
    heads: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _heads_divide_width(self) -> Size:
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        return self


def _size(value: object) -> str | dict[str, int]:
    """A named size, or the numbers of a :class:`Size` as a mapping; one error line for either form."""
    if isinstance(value, str) and value in SIZES:
        return value
    if isinstance(value, dict | Size):
        try:
            return Size.model_validate(value, from_attributes=True).model_dump()
        except ValidationError as e:
            err = e.errors()[0]
            msg = err["msg"].removeprefix("Value error, ")
            where = ".".join(str(p) for p in err["loc"])
            raise ValueError(f"{where}: {msg[0].lower() + msg[1:]}" if where else msg) from None
    raise ValueError(f"expected one of {', '.join(map(repr, SIZES))} or {{width, depth, heads}}")


SizeSpec = Annotated[str | dict[str, int], PlainValidator(_size)]


@ARCHITECTURES.register("igpt")
class IGPT(SequenceModel):
    """ImageGPT backbone.

    Args:
        size: one of ``SIZES``, or ``{width, depth, heads}`` (a :class:`Size`).
        image_size: input side in pixels; the sequence has ``image_size²`` tokens.
        in_chans: input channels (1 for grey, 3 for RGB).
        colours: palette size (the vocabulary).
        feature_layer: blocks run for the pooled features (``None``: ``depth // 2``).
    """

    provides = frozenset({CAUSAL})
    family = "transformer"

    def __init__(
        self,
        size: SizeSpec = "tiny",
        image_size: Annotated[int, Field(ge=2)] = 16,
        in_chans: Annotated[int, Field(ge=1)] = 1,
        colours: Annotated[int, Field(ge=2)] = 16,
        feature_layer: Annotated[int, Field(ge=1)] | None = None,
    ):
        super().__init__()
        if isinstance(size, str):
            width, depth, heads = SIZES[size]
        else:
            size = Size.model_validate(size, from_attributes=True)
            width, depth, heads = size.width, size.depth, size.heads
        feature_layer = depth // 2 if feature_layer is None else feature_layer
        if feature_layer > depth:
            raise ValueError(f"architecture.feature_layer={feature_layer} exceeds the depth ({depth})")
        self.palette = Palette(colours, in_chans)
        self.token_embed = nn.Embedding(colours, width)
        self.start_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, image_size**2, width))
        self.blocks = nn.ModuleList(Block(width, heads, qkv_bias=True, attn_layer=Attention) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        for block in self.blocks:
            block.apply(init_weights_vit_timm)  # truncated normal(0.02) linears, as GPT-2 and timm
        for p in (self.token_embed.weight, self.start_token, self.pos_embed):
            nn.init.normal_(p, std=0.02)
        self.feature_dim = self.token_dim = width
        self.in_chans = in_chans
        self.image_size = image_size
        self.feature_layer = feature_layer

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` → shifted inputs ``(B, T, D)``: start token, then tokens ``0 … T-2``."""
        x = self.token_embed(tokens[:, :-1])
        x = torch.cat([self.start_token.expand(len(tokens), -1, -1), x], 1)
        return x + self.pos_embed[:, : x.shape[1]]

    def forward_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` → final normed hidden states ``(B, T, D)``; position t has seen tokens < t."""
        x = self._embed(tokens)
        for block in self.blocks:
            x = block(x, is_causal=True)
        return self.norm(x)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Embeddings, then the ``feature_layer`` blocks the features pass through, one layer each;
        the blocks after them (unused by the features) and the norm go last, with the head."""
        used = "|".join(str(i) for i in range(self.feature_layer))
        return {"stem": r"^(?:token_embed|start_token|pos_embed)", "blocks": [(rf"^blocks\.({used})\.", None)]}

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "start_token"}

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` → every block's output, normed, ``(B, T, D)`` (what pretraining runs)."""
        return self.forward_tokens(self.tokens(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, C, H, W)`` → hidden states of block ``feature_layer``, layer-normalised, ``(B, T, D)``."""
        h = self._embed(self.tokens(x))
        for block in self.blocks[: self.feature_layer]:
            h = block(h, is_causal=True)
        return F.layer_norm(h, h.shape[-1:])

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features.mean(1)

    def block_features(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """After every block (``block1`` … ``blockN``, all ``depth`` of them, not only the first
        ``feature_layer``): layer-normalised without affine and averaged over positions, as
        :meth:`forward` does. Entry ``feature_layer - 1`` (named ``block{feature_layer}``) equals
        ``self(x)``; the last is the final block's, which equals ``self(x)`` only when
        ``feature_layer = depth``."""
        h = self._embed(self.tokens(x))
        out = []
        for i, block in enumerate(self.blocks):
            h = block(h, is_causal=True)
            out.append((f"block{i + 1}", self.pool(F.layer_norm(h, h.shape[-1:]))))
        return out
