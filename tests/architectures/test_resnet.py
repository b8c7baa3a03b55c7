"""The BiT ResNet-V2 backbone: GroupNorm + weight-standardised convolutions, depths, widths, stems."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from torch import nn

from bigmodel.architectures.resnet import ResNet


@pytest.mark.parametrize("depth", [18, 26, 50])
def test_every_conv_is_weight_standardised_and_every_norm_a_groupnorm(depth):
    net = ResNet(depth=depth, width=0.125, image_size=16, in_chans=1)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._NormBase | nn.GroupNorm
                                                    | nn.LayerNorm)]
    assert convs and all(isinstance(m, StdConv2d) for m in convs)
    assert norms and all(isinstance(m, nn.GroupNorm) for m in norms)
    assert len(convs) == {18: 17 + 3, 26: 25 + 4, 50: 49 + 4}[depth]  # + projection shortcuts


def test_conv_weights_are_standardised_in_forward(monkeypatch):
    """Every convolution the forward pass runs sees a weight with zero mean and unit variance per
    output channel, whatever the stored weights are."""
    torch.manual_seed(0)
    net = ResNet(depth=18, width=0.125, image_size=16, in_chans=3)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, StdConv2d):
                m.weight.mul_(3.0).add_(0.5)  # far from standardised
    seen = []
    conv2d = F.conv2d

    def spy(x, weight, *args, **kwargs):
        seen.append(weight.detach())
        return conv2d(x, weight, *args, **kwargs)

    monkeypatch.setattr(F, "conv2d", spy)
    net(torch.randn(2, 3, 16, 16))
    assert len(seen) == sum(isinstance(m, StdConv2d) for m in net.modules())
    for w in seen:
        flat = w.flatten(1)
        torch.testing.assert_close(flat.mean(1), torch.zeros(len(flat)), atol=1e-5, rtol=0)
        torch.testing.assert_close(flat.var(1, unbiased=False), torch.ones(len(flat)), atol=1e-4, rtol=0)


def test_small_image_stem_keeps_resolution():
    net = ResNet(depth=18, width=0.125, image_size=28, in_chans=1)
    assert [type(m) for m in net.net.stem] == [StdConv2d]
    assert net.net.stem.conv.stride == (1, 1) and net.net.stem.conv.kernel_size == (3, 3)
    feats = net.forward_features(torch.randn(2, 1, 28, 28))
    assert feats.shape == (2, net.feature_dim, 4, 4)  # 28 → 28, 14, 7, 4
    assert net.pool(feats).shape == (2, net.feature_dim)
    strided = ResNet(depth=18, width=0.125, image_size=28, in_chans=1, stem_stride=2)
    assert strided.forward_features(torch.randn(2, 1, 28, 28)).shape[-1] == 2


def test_large_images_get_bits_stem():
    net = ResNet(depth=18, width=0.125, image_size=96, in_chans=3)
    assert any(isinstance(m, nn.MaxPool2d) for m in net.net.stem)
    assert net.net.stem.conv.kernel_size == (7, 7)
    assert net.forward_features(torch.randn(1, 3, 96, 96)).shape[-1] == 3  # 96 / 32


@pytest.mark.parametrize("depth,width,dim", [(18, 1.0, 512), (18, 0.5, 256), (26, 0.25, 512), (50, 1.0, 2048)])
def test_width_multiplier_sets_feature_dim(depth, width, dim):
    assert ResNet(depth=depth, width=width, image_size=16).feature_dim == dim


def test_no_batch_statistics():
    """GroupNorm: an image's features do not depend on the batch or on train/eval mode."""
    torch.manual_seed(0)
    net = ResNet(depth=18, width=0.125, image_size=16, in_chans=1)
    x = torch.randn(4, 1, 16, 16)
    alone = net(x[:1])
    torch.testing.assert_close(net(x)[:1], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(net.eval()(x)[:1], alone, atol=1e-4, rtol=1e-4)
