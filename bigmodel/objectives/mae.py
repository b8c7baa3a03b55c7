"""Masked autoencoders (He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners").

Each image keeps a random subset of its patches (a fresh per-sample permutation, drawn with the
step's views from the step's generator, so that several processes mask as one does); the backbone encodes only those
(:meth:`ViT.forward_visible`); a light transformer decoder (its own width, fixed 2-D sin-cos
position embeddings, a learned mask token for every dropped patch) predicts the pixels of every
patch, and the loss is the mean squared error over the masked patches only — optionally against
per-patch normalised pixels (``norm_pix_loss``, the paper's better-transferring variant).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, init_weights_vit_timm
from torch import nn

from bigmodel.architectures.base import TOKENS, Backbone
from bigmodel.architectures.vit import Attention
from bigmodel.data.transforms import random_crop_flip
from bigmodel.objectives.base import Objective
from bigmodel.registry import OBJECTIVES


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Images ``(B, C, H, W)`` → patches ``(B, N, p·p·C)``, row-major as in the patch embedding."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """Inverse of :func:`patchify` for square images."""
    b, n, _ = patches.shape
    g = int(round(n**0.5))
    x = patches.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, g * p, g * p)


@OBJECTIVES.register("mae")
class MAE(Objective):
    """Args:
    mask_ratio: fraction of patches hidden from the encoder; it sees
        ``max(1, int(num_patches · (1 − mask_ratio)))`` of them.
    decoder_dim: width of the decoder (a multiple of 4, for the sin-cos embedding).
    decoder_depth: decoder blocks.
    decoder_heads: attention heads of the decoder.
    norm_pix_loss: regress per-patch normalised pixels (mean 0, variance 1 in each patch).
    crop_pad: pixels of random translation (pad-and-crop) augmentation; 0 disables it.
    flip: random horizontal flips.
    """

    requires = frozenset({TOKENS})

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int = 0,
        mask_ratio: Annotated[float, Field(gt=0, lt=1)] = 0.75,
        decoder_dim: Annotated[int, Field(ge=4, multiple_of=4)] = 128,
        decoder_depth: Annotated[int, Field(ge=1)] = 2,
        decoder_heads: Annotated[int, Field(ge=1)] = 4,
        norm_pix_loss: bool = False,
        crop_pad: Annotated[int, Field(ge=0)] = 0,
        flip: bool = False,
    ):
        super().__init__(backbone)
        if decoder_dim % decoder_heads:
            raise ValueError(f"objective.decoder_dim={decoder_dim} is not divisible by decoder_heads={decoder_heads}")
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.crop_pad, self.flip = crop_pad, flip
        self.patch_size = backbone.patch_size
        self.num_patches = backbone.num_patches
        self.num_visible = max(1, int(self.num_patches * (1 - mask_ratio)))
        grid = backbone.image_size // backbone.patch_size

        self.decoder_embed = nn.Linear(backbone.feature_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        pos = build_sincos2d_pos_embed([grid, grid], decoder_dim)
        self.register_buffer("decoder_pos", torch.cat([torch.zeros(1, decoder_dim), pos])[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads, qkv_bias=True, attn_layer=Attention)
                                            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size**2 * backbone.in_chans)
        for m in (self.decoder_embed, self.decoder_blocks, self.decoder_pred):
            m.apply(init_weights_vit_timm)
        nn.init.normal_(self.mask_token, std=0.02)

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """The images (cropped/flipped if asked) and each image's mask noise ``(B, N)``, both drawn
        from the step's generator: a process that trains some rows of the global batch masks them as
        one process training all of it does (see :mod:`bigmodel.train.distributed`)."""
        x = self.to_input(images)
        if self.crop_pad or self.flip:
            x = random_crop_flip(x, generator, pad=self.crop_pad, flip=self.flip)
        return [x, torch.rand(len(images), self.num_patches, generator=generator)]

    def random_mask(self, batch: int, device: torch.device,
                    noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking: the ``num_visible`` patches of lowest ``noise`` ``(B, N)`` are
        kept (noise from the global RNG when not given).

        Returns:
            ids_keep ``(B, K)`` visible patch indices, ids_restore ``(B, N)`` (position of each patch
            in the kept-then-masked order), mask ``(B, N)`` float, 1 where a patch is masked.
        """
        noise = torch.rand(batch, self.num_patches, device=device) if noise is None else noise.to(device)
        ids_shuffle = noise.argsort(1)
        ids_restore = ids_shuffle.argsort(1)
        mask = (ids_restore >= self.num_visible).float()
        return ids_shuffle[:, : self.num_visible], ids_restore, mask

    def decode(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Encoder output ``(B, 1 + K, D)`` → predicted patches ``(B, N, p·p·C)`` in patch order."""
        z = self.decoder_embed(latent)
        b, d = len(z), z.shape[-1]
        seq = torch.cat([z[:, 1:], self.mask_token.expand(b, self.num_patches - z.shape[1] + 1, -1)], 1)
        seq = seq.gather(1, ids_restore[..., None].expand(-1, -1, d))
        seq = torch.cat([z[:, :1], seq], 1) + self.decoder_pos
        for block in self.decoder_blocks:
            seq = block(seq)
        return self.decoder_pred(self.decoder_norm(seq))[:, 1:]

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The regression target ``(B, N, p·p·C)`` of images ``(B, C, H, W)``."""
        t = patchify(x, self.patch_size)
        if self.norm_pix_loss:
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
        return t

    def loss(self, x: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches (``mask == 1``) only."""
        err = (pred.float() - self.target(x).float()).pow(2).mean(-1)
        return (err * mask).sum() / mask.sum()

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """views: ``[(B, C, H, W), mask noise (B, N)]`` (as :meth:`views` makes them; without the
        noise, masks come from the global RNG) → ``{"loss"}``; labels are ignored."""
        x, noise = views[0], (views[1] if len(views) > 1 else None)
        ids_keep, ids_restore, mask = self.random_mask(len(x), x.device, noise)
        pred = self.decode(self.backbone.forward_visible(x, ids_keep), ids_restore)
        return {"loss": self.loss(x, pred, mask)}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mask, encode and decode a batch (for figures), in eval mode.

        Args:
            images: uint8 ``(B, C, H, W)`` (normalised here) or already normalised float inputs.

        Returns:
            ``input``, ``masked`` (masked patches set to 0), ``prediction`` (every patch as
            decoded, un-normalised with each patch's own statistics under ``norm_pix_loss``) and
            ``reconstruction`` (visible patches from the input, masked ones predicted), all
            ``(B, C, H, W)`` in normalised input space, plus ``mask`` ``(B, N)`` (1 = masked).
        """
        was_training = self.training
        self.eval()
        x = self.to_input(images) if images.dtype == torch.uint8 else images
        ids_keep, ids_restore, mask = self.random_mask(len(x), x.device)
        pred = self.decode(self.backbone.forward_visible(x, ids_keep), ids_restore).float()
        patches = patchify(x, self.patch_size)
        if self.norm_pix_loss:
            pred = pred * (patches.var(-1, keepdim=True) + 1e-6).sqrt() + patches.mean(-1, keepdim=True)
        m = mask[..., None]
        p, c = self.patch_size, x.shape[1]
        self.train(was_training)
        return {
            "input": x,
            "masked": unpatchify(patches * (1 - m), p, c),
            "prediction": unpatchify(pred, p, c),
            "reconstruction": unpatchify(patches * (1 - m) + pred * m, p, c),
            "mask": mask,
        }
