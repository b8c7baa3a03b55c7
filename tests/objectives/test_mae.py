"""Masked autoencoder: per-sample masking, encoder on visible tokens only, loss on masked patches."""

from __future__ import annotations

import pytest
import torch

from bigmodel.architectures.vit import ViT
from bigmodel.objectives.mae import MAE, patchify, unpatchify


def _mae(**kw) -> MAE:
    torch.manual_seed(0)
    net = ViT(size="nano", image_size=16, patch_size=4, in_chans=1)
    return MAE(net, decoder_dim=32, decoder_depth=1, decoder_heads=2, **kw)


def test_patchify_round_trip_matches_patch_order() -> None:
    x = torch.randn(2, 3, 8, 8)
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    torch.testing.assert_close(p[0, 1].view(4, 4, 3).permute(2, 0, 1), x[0, :, :4, 4:])  # patch 1: top right
    torch.testing.assert_close(unpatchify(p, 4, 3), x)


@pytest.mark.parametrize("ratio, visible", [(0.75, 4), (0.5, 8), (0.9, 1)])
def test_exactly_the_requested_visible_tokens_per_sample(ratio: float, visible: int) -> None:
    obj = _mae(mask_ratio=ratio)
    ids_keep, ids_restore, mask = obj.random_mask(5, torch.device("cpu"))
    assert ids_keep.shape == (5, visible)
    assert all(len(set(row.tolist())) == visible for row in ids_keep)  # distinct patches
    assert (mask.sum(1) == 16 - visible).all()
    assert (mask.gather(1, ids_keep) == 0).all()  # kept = unmasked
    assert len({tuple(sorted(r.tolist())) for r in ids_keep}) > 1  # per-sample masks
    seen = []
    real = obj.backbone.forward_visible
    obj.backbone.forward_visible = lambda x, ids: seen.append(ids.shape) or real(x, ids)
    obj([torch.randn(5, 1, 16, 16), torch.rand(5, 16)], torch.full((5,), -1))
    assert seen == [(5, visible)]  # the encoder ran on exactly those tokens


def test_masks_come_from_the_steps_generator() -> None:
    """The mask noise is a view drawn from the step's generator (so every process of a distributed
    run masks its rows as one process does); the forward pass keeps the lowest-noise patches."""
    obj = _mae()
    images = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8)
    x, noise = obj.views(images, torch.Generator().manual_seed(3))
    x2, noise2 = obj.views(images, torch.Generator().manual_seed(3))
    assert torch.equal(noise, noise2) and noise.shape == (3, 16)
    assert not torch.equal(noise, obj.views(images, torch.Generator().manual_seed(4))[1])
    ids_keep = obj.random_mask(3, x.device, noise)[0]
    assert torch.equal(ids_keep, noise.argsort(1)[:, :obj.num_visible])


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_loss_ignores_visible_patches_and_matches_a_naive_reference(norm_pix_loss: bool) -> None:
    """For fixed predictions and mask, the loss does not move when only the pixels of visible
    patches of the target change, and moves when a masked patch changes."""
    obj = _mae(norm_pix_loss=norm_pix_loss)
    x = torch.randn(2, 1, 16, 16)
    _, ids_restore, mask = obj.random_mask(2, x.device)
    pred = torch.randn(2, 16, 16)
    loss = obj.loss(x, pred, mask)

    pixel_mask = unpatchify(mask[..., None].expand(-1, -1, 16), 4, 1).bool()
    visible_changed = torch.where(pixel_mask, x, torch.randn_like(x))
    torch.testing.assert_close(obj.loss(visible_changed, pred, mask), loss)
    masked_changed = torch.where(pixel_mask, torch.randn_like(x), x)
    assert not torch.isclose(obj.loss(masked_changed, pred, mask), loss)

    total, count = 0.0, 0
    for b in range(2):  # naive reference: loop over masked patches
        for n in range(16):
            if mask[b, n]:
                t = x[b, 0, (n // 4) * 4:(n // 4) * 4 + 4, (n % 4) * 4:(n % 4) * 4 + 4].flatten()
                if norm_pix_loss:
                    t = (t - t.mean()) / (t.var() + 1e-6).sqrt()
                total, count = total + ((pred[b, n] - t) ** 2).mean(), count + 1
    torch.testing.assert_close(loss, total / count)


def test_forward_backward_and_reconstruct() -> None:
    obj = _mae(norm_pix_loss=True)
    x = torch.randn(3, 1, 16, 16)
    out = obj([x], torch.full((3,), -1))
    assert set(out) == {"loss"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    # every parameter learns: encoder (incl. positions and class token), mask token, decoder
    assert [n for n, p in obj.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())] == []

    rec = obj.reconstruct(torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8))
    assert rec["reconstruction"].shape == (3, 1, 16, 16) and obj.training
    visible = ~unpatchify(rec["mask"][..., None].expand(-1, -1, 16), 4, 1).bool()
    torch.testing.assert_close(rec["reconstruction"][visible], rec["input"][visible])
    assert (rec["masked"][~visible] == 0).all()
