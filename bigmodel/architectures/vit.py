"""Vision Transformer (Dosovitskiy et al., 2021, arXiv:2010.11929) on timm's VisionTransformer.

timm supplies patch embedding, pre-norm blocks with GELU MLPs and fused SDPA attention; this file
adds the backbone interface, the named sizes, the token-dropping path of masked autoencoders
(:meth:`ViT.forward_visible`) and optional mixture-of-experts MLPs (``moe``, see
:mod:`bigmodel.architectures.moe`). Features are the tokens after the final norm; ``pool`` returns
the class token (``global_pool: token``) or the mean of the patch tokens (``global_pool: avg``,
as MAE uses for transfer).

:class:`Attention` is timm's, except that on a CPU bf16 queries, keys and values are attended in
fp32: PyTorch's CPU flash-attention kernel runs its backward much slower in bf16 than in fp32, which
made bf16 autocast lose most of what its bf16 matrix products win (measurements:
``benchmarks/results/cpu_bf16_attention.md``). Every transformer of the framework (ViT, the MAE
decoder, ImageGPT) uses it.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import VisionTransformer

from bigmodel.architectures.base import TIMM_INSTEAD, TOKENS, Backbone, TimmSpec, no_timm
from bigmodel.architectures.moe import MoEConfig, make_sparse
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


class Attention(TimmAttention):
    """timm's multi-head self-attention (same parameters and state dict, the same outputs to the bit),
    attending in fp32 on a CPU when the projections run in bf16 (see the module docstring)."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """``(B, N, C)`` → ``(B, N, C)``."""
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x)
        dtype = qkv.dtype
        fp32 = qkv.device.type == "cpu" and dtype == torch.bfloat16
        # (B, H, N, d) views of one (B, N, 3, H, d) buffer: their gradients are stacked straight into
        # qkv's layout (timm's permute-then-unbind needs a copy more in the backward pass)
        q, k, v = (t.transpose(1, 2) for t in qkv.reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2))
        q, k = self.q_norm(q), self.k_norm(k)
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():  # autocast would cast back
            if fp32:
                q, k, v = q.float(), k.float(), v.float()
                if attn_mask is not None and attn_mask.is_floating_point():
                    attn_mask = attn_mask.float()
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                               dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.to(dtype).transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


@ARCHITECTURES.register("vit")
class ViT(Backbone):
    """ViT backbone.

    Args:
        size: one of ``SIZES`` (width, depth, heads).
        image_size: input side in pixels.
        patch_size: patch side; ``image_size`` must be divisible by it.
        in_chans: input channels (1 for grey, 3 for RGB).
        drop_path: stochastic depth rate.
        global_pool: pooled features: the class token, or the mean of the patch tokens.
        moe: mixture-of-experts settings (``experts``, ``top_k``, ``every``, ``capacity_factor``,
            ``aux_weight``); ``None`` keeps every MLP dense.
    """

    provides = frozenset({TOKENS})
    family = "transformer"

    def __init__(
        self,
        size: Literal["nano", "micro", "tiny", "small", "base", "large"] = "tiny",
        image_size: Annotated[int, Field(ge=8)] = 32,
        patch_size: Annotated[int, Field(ge=1)] = 4,
        in_chans: Annotated[int, Field(ge=1)] = 3,
        drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0,
        global_pool: Literal["token", "avg"] = "token",
        moe: MoEConfig | None = None,
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
            global_pool="token", attn_layer=Attention,
        )
        self.feature_dim = width
        self.in_chans = in_chans
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.global_pool = global_pool
        self.moe_blocks: list[int] = []
        if moe is not None:
            moe = MoEConfig.model_validate(moe)
            self.moe_blocks = make_sparse(self.vit.blocks, moe)
            if not self.moe_blocks:
                raise ValueError(f"architecture.moe.every={moe.every} exceeds the depth ({depth}): no MoE block")

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's ViT grouping under our ``vit.`` prefix: embeddings, then each block, the final norm last."""
        return {"stem": r"^vit\.(?:cls_token|pos_embed|patch_embed|norm_pre)",
                "blocks": [(r"^vit\.blocks\.(\d+)", None), (r"^vit\.norm", (99999,))]}

    def no_weight_decay(self) -> set[str]:
        return {"vit.pos_embed", "vit.cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → tokens ``(B, 1 + N, D)`` (class token first), normed."""
        return self.vit.forward_features(x)

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only some patch tokens (the MAE encoder).

        Args:
            x: images ``(B, C, H, W)``.
            ids_keep: ``(B, K)`` indices in ``[0, num_patches)`` of the patches to keep, per sample
                (row-major patch order).

        Returns:
            ``(B, 1 + K, D)``: the class token, then the kept tokens in ``ids_keep`` order, normed.
            Each kept token carries its own position embedding; dropped ones are never computed.
        """
        v = self.vit
        tokens = v.patch_embed(x) + v.pos_embed[:, 1:]  # (B, N, D)
        tokens = tokens.gather(1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        cls = (v.cls_token + v.pos_embed[:, :1]).expand(len(x), -1, -1)
        tokens = v.norm_pre(v.pos_drop(torch.cat([cls, tokens], 1)))
        return v.norm(v.blocks(tokens))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, 0] if self.global_pool == "token" else features[:, 1:].mean(1)

    def block_features(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """After each transformer block (``block1`` … ``blockN``), the final norm applied and pooled
        as :meth:`pool` pools (timm's ``forward_intermediates``); the last equals ``self(x)``."""
        _, inter = self.vit.forward_intermediates(x, norm=True, output_fmt="NLC", return_prefix_tokens=True)
        return [(f"block{i + 1}", self.pool(torch.cat([prefix, tokens], 1)))
                for i, (tokens, prefix) in enumerate(inter)]


# our sizes → the timm entry point of the same width/depth/heads (nano and micro have none: the entry
# point only picks timm's VisionTransformer, every size argument is given explicitly)
TIMM_NAMES = {"tiny": "vit_tiny_patch16_224", "small": "vit_small_patch16_224",
              "base": "vit_base_patch16_224", "large": "vit_large_patch16_224"}


def to_timm(bb: ViT, section: dict[str, Any]) -> TimmSpec:
    """Our ViT is timm's VisionTransformer (class token, learned position embeddings over class and
    patch tokens, pre-norm blocks with GELU MLPs and a fused qkv, final LayerNorm, no ``fc_norm``):
    the same module tree, so the state dict only loses our ``vit.`` prefix. ``global_pool: avg``
    pools the patch tokens after the final norm, which is timm's ``global_pool='avg'`` with
    ``fc_norm=False`` (timm's default for avg would move the norm after pooling).

    Raises:
        ExportError: mixture-of-experts blocks (timm's blocks have one dense MLP).
    """
    if bb.moe_blocks:
        moe = bb.vit.blocks[bb.moe_blocks[0]].mlp.cfg
        blocks = ", ".join(str(i + 1) for i in bb.moe_blocks)
        raise no_timm(f"architecture.moe: blocks {blocks} of {len(bb.vit.blocks)} are mixture-of-experts MLPs "
                      f"({moe.experts} experts behind a router, top-{moe.top_k} routing); timm's VisionTransformer has "
                      f"one dense MLP per block, so no timm model holds these weights; {TIMM_INSTEAD}")
    v = bb.vit
    kwargs = dict(img_size=bb.image_size, patch_size=bb.patch_size, in_chans=bb.in_chans, embed_dim=v.embed_dim,
                  depth=len(v.blocks), num_heads=v.blocks[0].attn.num_heads, class_token=True,
                  global_pool=bb.global_pool, fc_norm=False)
    state = {k.removeprefix("vit."): t for k, t in bb.state_dict().items()}
    return TimmSpec(TIMM_NAMES.get(section.get("size"), TIMM_NAMES["tiny"]), kwargs, state)
