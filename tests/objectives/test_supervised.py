"""Supervised objective: label smoothing, MixUp / CutMix images and targets, forward/backward."""

from __future__ import annotations

import pytest
import torch

from bigmodel.architectures.resnet import ResNet
from bigmodel.architectures.vit import ViT
from bigmodel.objectives.supervised import Supervised, mix, mix_params


def _batch(n: int = 6, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i + 1 (so every pixel tells where it came from); label i."""
    x = (torch.arange(n, dtype=torch.float32) + 1)[:, None, None, None].expand(n, 1, size, size).clone()
    return x, torch.arange(n)


def test_mix_params_are_deterministic_per_generator():
    a = mix_params(16, torch.Generator().manual_seed(1), 0.4, 1.0)
    b = mix_params(16, torch.Generator().manual_seed(1), 0.4, 1.0)
    c = mix_params(16, torch.Generator().manual_seed(2), 0.4, 1.0)
    assert a.shape == (16, 6) and torch.equal(a, b) and not torch.equal(a, c)
    lam, cut, box = a[:, 0], a[:, 1].bool(), a[:, 2:]
    # a CutMix box inside the image is a square of side sqrt(1 - lam): the pasted share is 1 - lam
    inside = cut & (box > 0).all(1) & (box < 1).all(1)
    assert (int(cut.sum()), int(inside.sum())) == (6, 3)  # of 16 at this seed: 6 CutMix, 3 boxes unclipped
    side = (1 - lam[inside]).sqrt()
    torch.testing.assert_close(box[inside, 1] - box[inside, 0], side)
    torch.testing.assert_close(box[inside, 3] - box[inside, 2], side)
    never = mix_params(16, torch.Generator().manual_seed(1), 0.4, 1.0, prob=0.0)
    assert torch.equal(never[:, :2], torch.tensor([[1.0, 0.0]]).expand(16, 2))  # lam 1, no CutMix


def test_mixup_blends_images_and_targets_alike():
    x, y = _batch()
    params = mix_params(6, torch.Generator().manual_seed(0), mixup_alpha=1.0, cutmix_alpha=0.0)
    assert not params[:, 1].any()
    mixed, targets = mix(x, y, params, num_classes=6)
    lam = params[:, 0]
    torch.testing.assert_close(mixed[:, 0, 0, 0], lam * x[:, 0, 0, 0] + (1 - lam) * x.flip(0)[:, 0, 0, 0])
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    for i in range(6):
        j = 5 - i
        expected = torch.zeros(6)
        expected[i] += lam[i]
        expected[j] += 1 - lam[i]
        torch.testing.assert_close(targets[i], expected)


def test_cutmix_targets_equal_the_pixel_shares():
    x, y = _batch(n=8, size=16)
    params = mix_params(8, torch.Generator().manual_seed(5), mixup_alpha=0.0, cutmix_alpha=1.0)
    assert params[:, 1].all()
    mixed, targets = mix(x, y, params, num_classes=8)
    assert set(mixed.unique().tolist()) <= set(range(1, 9))  # pixels are copied, not blended
    for i in range(8):
        own = (mixed[i] == i + 1).float().mean()
        partner = (mixed[i] == 8 - i).float().mean()
        if i != 8 - 1 - i:
            torch.testing.assert_close(targets[i, i], own)
            torch.testing.assert_close(targets[i, 7 - i], partner)


def test_label_smoothing_applies_to_mixed_targets_and_no_mixing_is_identity():
    x, y = _batch()
    params = mix_params(6, torch.Generator().manual_seed(0), 0.2, 1.0, prob=0.0)
    mixed, targets = mix(x, y, params, num_classes=6, smoothing=0.3)
    assert torch.equal(mixed, x)
    torch.testing.assert_close(targets, torch.eye(6) * 0.7 + 0.05)


@pytest.mark.parametrize("arch", ["resnet", "vit"])
@pytest.mark.parametrize("mixing", [{}, {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}])
def test_forward_backward_step(arch, mixing):
    torch.manual_seed(0)
    net = (ResNet(depth=18, width=0.125, image_size=16, in_chans=1) if arch == "resnet"
           else ViT(size="nano", image_size=16, patch_size=4, in_chans=1))
    obj = Supervised(net, num_classes=4, **mixing)
    images = torch.randint(0, 256, (8, 1, 16, 16), dtype=torch.uint8)
    views = obj.views(images, torch.Generator().manual_seed(0))
    assert len(views) == (2 if mixing else 1)
    out = obj(views, torch.arange(8) % 4)
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert all(p.grad is not None for p in obj.parameters() if p.requires_grad)
