"""The BiT ResNet-V2 backbone: GroupNorm + weight-standardised convolutions, depths, widths, stems."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d as TimmStdConv2d
from torch import nn

from bigmodel.architectures.resnet import ResNet, StdConv2d


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
                m.weight.copy_(3.0 * torch.randn_like(m.weight) + 0.5)  # far from standardised (and not zero)
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


def _shortcut(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A pre-activation block's shortcut: the input, or its projection of the pre-activated input."""
    return x if block.downsample is None else block.downsample(block.norm1(x))


@pytest.mark.parametrize("depth", [18, 50])
def test_residual_branches_start_at_zero(depth):
    """At initialisation every block is its shortcut (zero-init last conv of each branch), so the
    random network is the stem, the stage projections and the final norm, computed here by hand.
    With timm's init the branches, ~sqrt(fan_in) larger than the shortcuts, made the random twin a
    near-chance feature extractor (CIFAR-10 linear 12.6% vs 22.1%, see the module docstring)."""
    torch.manual_seed(0)
    net = ResNet(depth=depth, width=0.125, image_size=16, in_chans=3)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        h = net.net.stem(x)
        for stage in net.net.stages:
            for block in stage.blocks:
                assert torch.equal(block(h), _shortcut(block, h))
                h = _shortcut(block, h)
        reference = net.net.norm(h).mean((2, 3))
        assert torch.equal(net(x), reference)


def test_zero_init_last_false_keeps_random_branches():
    torch.manual_seed(0)
    net = ResNet(depth=18, width=0.125, image_size=16, in_chans=3, zero_init_last=False)
    x = torch.randn(2, 3, 16, 16)
    block = net.net.stages[0].blocks[0]
    with torch.no_grad():
        h = net.net.stem(x)
        assert not torch.allclose(block(h), _shortcut(block, h))


def test_a_zero_branch_takes_full_scale_at_the_first_update():
    """Weight standardisation: after one optimiser step, the last conv of a branch is a unit-variance
    filter, as a randomly initialised one would be (up to StdConv's eps of 1e-8 against the weights'
    variance: lr 0.1 here; at the recipes' lr of 2e-3 it reaches 99.7% of it)."""
    from timm.layers import StdConv2d

    torch.manual_seed(0)
    net = ResNet(depth=18, width=0.125, image_size=16, in_chans=3)
    conv = net.net.stages[0].blocks[0].conv2
    assert isinstance(conv, StdConv2d) and torch.equal(conv.weight, torch.zeros_like(conv.weight))
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3, 16, 16)).pow(2).sum().backward()
    opt.step()
    w = conv.weight.detach().flatten(1)
    standardised = (w - w.mean(1, keepdim=True)) / (w.var(1, unbiased=False, keepdim=True) + 1e-8).sqrt()
    torch.testing.assert_close(standardised.var(1, unbiased=False), torch.ones(len(w)), atol=1e-4, rtol=0)


def test_std_conv_is_timms_up_to_float_rounding():
    """While training, bigmodel's StdConv2d standardises with layer_norm (faster on a CPU) what timm's
    does with batch_norm: the same outputs and gradients to float rounding, the same state dict; in
    evaluation exactly timm's; an all-zero weight (zero_init_last) convolves as zero."""
    torch.manual_seed(0)
    for out_ch, in_ch, k in ((64, 3, 3), (256, 64, 1), (32, 16, 3)):
        ours, ref = (StdConv2d(in_ch, out_ch, kernel_size=k, eps=1e-8),
                     TimmStdConv2d(in_ch, out_ch, kernel_size=k, eps=1e-8))
        assert isinstance(ours, TimmStdConv2d) and ours.state_dict().keys() == ref.state_dict().keys()
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(2, in_ch, 8, 8)
        y, y_ref = ours(x), ref(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item())
        y.square().sum().backward()
        y_ref.square().sum().backward()
        g_ref = ref.weight.grad
        torch.testing.assert_close(ours.weight.grad, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item())
        assert torch.equal(ours.eval()(x), ref.eval()(x))
        with torch.no_grad():
            ours.weight.zero_()
        assert torch.equal(ours.train()(x), torch.zeros_like(y))
