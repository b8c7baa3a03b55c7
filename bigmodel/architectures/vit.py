"""Vision Transformer (Dosovitskiy et al., 2021, arXiv:2010.11929) on timm's VisionTransformer.

timm supplies patch embedding, pre-norm blocks with GELU MLPs and fused SDPA attention; this file
adds the backbone interface and the named sizes. Features are the class token after the final
norm; ``pool`` returns it.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field
from timm.models.vision_transformer import VisionTransformer

from bigmodel.architectures.base import TOKENS, Backbone
from bigmodel.registry import ARCHITECTURES

# width, depth, heads. `nano` and `micro` are CPU-sized members of the same family.
SIZES: dict[str, tuple[int, int, int]] = {
    "nano": (96, 4, 3),
    "micro": (128, 6, 4),
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


@ARCHITECTURES.register("vit")
class ViT(Backbone):
    """ViT backbone.

    Args:
        size: one of ``SIZES`` (width, depth, heads).
        image_size: input side in pixels.
        patch_size: patch side; ``image_size`` must be divisible by it.
        in_chans: input channels (1 for grey, 3 for RGB).
        drop_path: stochastic depth rate.
    """

    provides = frozenset({TOKENS})

    def __init__(
        self,
        size: Literal["nano", "micro", "tiny", "small", "base", "large"] = "tiny",
        image_size: Annotated[int, Field(ge=8)] = 32,
        patch_size: Annotated[int, Field(ge=1)] = 4,
        in_chans: Annotated[int, Field(ge=1)] = 3,
        drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"architecture.image_size={image_size} is not divisible by patch_size={patch_size}"
            )
        width, depth, heads = SIZES[size]
        self.vit = VisionTransformer(
            img_size=image_size, patch_size=patch_size, in_chans=in_chans, num_classes=0,
            embed_dim=width, depth=depth, num_heads=heads, drop_path_rate=drop_path,
            global_pool="token",
        )
        self.feature_dim = width
        self.in_chans = in_chans
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → tokens ``(B, 1 + N, D)`` (class token first), normed."""
        return self.vit.forward_features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, 0]
