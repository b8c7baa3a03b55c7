"""BiT ResNet-V2 (Kolesnikov et al., 2020, arXiv:1912.11370) on timm's ResNetV2.

Pre-activation residual blocks (He et al., 2016, arXiv:1603.05027) in which every convolution is
weight-standardised (``StdConv2d``; Qiao et al., 2019, arXiv:1903.10520) and every norm is a
GroupNorm (``GroupNormAct``; Wu & He, 2018): no batch statistics, so the backbone behaves the same
at any batch size, in training and in evaluation. timm supplies the stages, blocks and layers; this
file adds the backbone interface, the named depths, a float width multiplier and a stem for small
images.

Stems. BiT's ImageNet stem (7x7 stride-2 conv + 3x3 stride-2 max-pool) divides the resolution by 4
before the first block, leaving a 28 px digit 7x7 pixels wide at stage 1 and 1x1 at the end. For
small inputs (``image_size <= 64`` under ``stem="auto"``) the stem is one 3x3 stride-1 standardised
conv with no pooling, as in the CIFAR ResNets; stages 2-4 then halve the map (28 → 28, 14, 7, 4).
``stem_stride=2`` makes that conv stride 2, a quarter of the compute for a CPU budget (28 → 14, 7,
4, 2), still far gentler than BiT's stem.

Initialisation. Each residual branch ends with its last convolution zero (``zero_init_last``, the
"zero-γ" of Goyal et al., 2017, arXiv:1706.02677; timm's ``zero_init_last``), so at initialisation
every block is its shortcut. Without it the random network is near chance as a feature extractor
(CIFAR-10, ResNet-18 x0.25: kNN 10.8% / linear 12.6% on 5k/2k images; 20.0 / 22.1 with it): a
weight-standardised convolution's output has a standard deviation of about ``sqrt(fan_in)`` (9·C
for a 3x3 conv over C channels), so the branches drown the shortcuts and the random ResNet acts as a
17-layer plain network of GroupNorm-ReLU-conv layers, whose output forgets its input. Pretraining is
not slowed: weight standardisation makes a branch's scale independent of its weights, so a zero conv
takes its full scale at the first update.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from timm.layers import GroupNormAct, make_divisible
from timm.layers import StdConv2d as TimmStdConv2d
from timm.models.resnetv2 import ResNetV2
from torch import nn

from bigmodel.architectures.base import TIMM_INSTEAD, Backbone, TimmSpec, no_timm
from bigmodel.registry import ARCHITECTURES

# depth → (blocks per stage, stage widths at width 1, bottleneck blocks?)
DEPTHS: dict[int, tuple[tuple[int, ...], tuple[int, ...], bool]] = {
    18: ((2, 2, 2, 2), (64, 128, 256, 512), False),
    26: ((2, 2, 2, 2), (256, 512, 1024, 2048), True),
    50: ((3, 4, 6, 3), (256, 512, 1024, 2048), True),
}
SMALL_IMAGE = 64  # `stem="auto"` takes the small-image stem up to this input side


class StdConv2d(TimmStdConv2d):
    """timm's weight-standardised convolution (same parameters, state dict and arguments) that, while
    training, standardises with ``layer_norm`` over each output channel's weights instead of
    ``batch_norm`` over a ``(1, out, fan_in)`` view: the same ``(w - mean) / sqrt(var + eps)``
    (biased variance) to float rounding, in a vectorised pass that accumulates in fp32 where
    batch_norm's CPU kernel accumulates in fp64. On a CPU it is 2.4x faster forward and 1.4x forward +
    backward (torch 2.14): the 23.5M weights of ResNet-50 are standardised at every step, ~10% of a
    BiT-R50 step at 64 px before. In evaluation it is timm's own computation, so that features match
    timm's model (exports, comparisons) to the bit rather than to rounding amplified over 50 layers."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        w = self.weight
        w = F.layer_norm(w.reshape(self.out_channels, -1), (w[0].numel(),), eps=self.eps).reshape_as(w)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _group_norm(num_channels: int, groups: int = 32, **kwargs: Any) -> GroupNormAct:
    """GroupNorm(+ReLU) with ``groups`` groups, fewer when the width does not divide (narrow nets)."""
    return GroupNormAct(num_channels, num_groups=math.gcd(groups, num_channels), **kwargs)


@ARCHITECTURES.register("resnet")
class ResNet(Backbone):
    """BiT ResNet-V2 backbone: GroupNorm + weight-standardised convolutions.

    Args:
        depth: 18 (basic blocks), 26 or 50 (bottleneck blocks).
        width: channel multiplier (BiT's ``x1``, ``x3``...; below 1 for CPU-sized nets); widths
            are rounded to multiples of 8.
        image_size: input side in pixels.
        in_chans: input channels (1 for grey, 3 for RGB).
        stem: ``small`` (one 3x3 conv, no pooling), ``bit`` (7x7 stride-2 conv + max-pool), or
            ``auto`` (``small`` when ``image_size <= 64``).
        stem_stride: stride of the ``small`` stem's conv (1, or 2 to save compute).
        groups: GroupNorm groups (32 in BiT).
        drop_path: stochastic depth rate.
        zero_init_last: start each residual branch at zero (see the module docstring); ``false``
            keeps timm's ResNetV2 initialisation, in which every branch is random.
    """

    def __init__(
        self,
        depth: Literal[18, 26, 50] = 18,
        width: Annotated[float, Field(gt=0, le=8)] = 1.0,
        image_size: Annotated[int, Field(ge=8)] = 32,
        in_chans: Annotated[int, Field(ge=1)] = 3,
        stem: Literal["auto", "small", "bit"] = "auto",
        stem_stride: Literal[1, 2] = 1,
        groups: Annotated[int, Field(ge=1)] = 32,
        drop_path: Annotated[float, Field(ge=0, lt=1)] = 0.0,
        zero_init_last: bool = True,
    ):
        super().__init__()
        layers, channels, bottleneck = DEPTHS[depth]
        conv = partial(StdConv2d, eps=1e-8)  # BiT's epsilon
        norm = partial(_group_norm, groups=groups)
        stem_chs = make_divisible(64 * width)
        self.net = ResNetV2(
            layers=list(layers), channels=tuple(make_divisible(c * width) for c in channels),
            num_classes=0, in_chans=in_chans, stem_chs=stem_chs, stem_type="fixed",  # BiT's stem
            basic=not bottleneck, bottle_ratio=0.25 if bottleneck else 1.0,
            conv_layer=conv, norm_layer=norm, drop_path_rate=drop_path, zero_init_last=zero_init_last,
        )
        if stem == "small" or (stem == "auto" and image_size <= SMALL_IMAGE):
            self.net.stem = nn.Sequential(OrderedDict(conv=conv(in_chans, stem_chs, kernel_size=3, stride=stem_stride)))
            nn.init.kaiming_normal_(self.net.stem.conv.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim = self.net.num_features
        self.in_chans = in_chans
        self.image_size = image_size
        self.depth = depth

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → pre-activated final map ``(B, feature_dim, H', W')`` (GroupNorm + ReLU)."""
        return self.net.forward_features(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pooling → ``(B, feature_dim)``."""
        return features.mean((2, 3))

    def block_features(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """After each residual block (``s{stage}b{block}``, 1-based), globally average-pooled. The
        network is pre-activation: a block's output is the raw residual stream, except the last
        block's, which passes the final GroupNorm + ReLU as the features do, so the last entry
        equals ``self(x)``."""
        h = self.net.stem(x)
        out = []
        for si, stage in enumerate(self.net.stages):
            for bi, block in enumerate(stage.blocks):
                h = block(h)
                out.append([f"s{si + 1}b{bi + 1}", h])
        out[-1][1] = self.net.norm(h)
        return [(name, self.pool(h)) for name, h in out]


RESNET_STEMS = "'', 'fixed', 'same', 'deep', 'deep_fixed', 'deep_same', 'tiered'"  # timm ResNetV2's stem_type values


def _standardized(conv: nn.Conv2d) -> torch.Tensor:
    """The weight a ``StdConv2d`` convolves with: standardised per output channel, exactly as its
    forward computes it."""
    w = conv.weight.detach()
    return F.batch_norm(w.reshape(1, conv.out_channels, -1), None, None, training=True, momentum=0.0,
                        eps=conv.eps).reshape_as(w)


def to_timm(bb: ResNet, section: dict[str, Any]) -> TimmSpec:
    """Our ResNet is timm's ResNetV2 with BiT's settings. Depth 50 is timm's ``resnetv2_50x1_bit``
    (weight-standardised convolutions with BiT's epsilon 1e-8) with our widths. Depths 18 and 26 have
    no timm entry point with weight-standardised convolutions whose blocks can be set by keyword (the
    ``_bit`` entry points fix 50/101/152 layers, and a JSON config cannot name a convolution class), so
    they are ``resnetv2_18`` / ``resnetv2_50`` with our blocks, GroupNorm and plain convolutions that
    hold the standardised weights: the same outputs, but further training in timm would not
    standardise them.

    Raises:
        ExportError: the small-image stem (every timm ResNetV2 stem ends in a stride-2 max-pool
            after a stride-2 conv), or a GroupNorm with other than 32 groups (timm's
            ``norm_layer='groupnorm'`` has 32, and a JSON config cannot pass another count).
    """
    net = bb.net
    if not hasattr(net.stem, "pool"):
        conv = net.stem.conv
        raise no_timm(
            f"architecture.stem={section.get('stem', 'auto')!r} at image_size={bb.image_size} is the small-image stem "
            f"(one {conv.kernel_size[0]}x{conv.kernel_size[0]} stride-{conv.stride[0]} convolution, no max-pool); "
            f"timm's ResNetV2 has no such stem: each of its stem_type values ({RESNET_STEMS}) is a stride-2 "
            f"convolution followed by a stride-2 max-pool (input / 4), and a config cannot replace it; {TIMM_INSTEAD}, "
            f"or pretrain with architecture.stem=bit")
    for name, m in net.named_modules():
        if isinstance(m, GroupNormAct) and m.num_groups != 32:
            raise no_timm(
                f"architecture.groups={section.get('groups', 32)}, width={section.get('width', 1.0)}: the GroupNorm "
                f"{name} over {m.num_channels} channels has {m.num_groups} groups; timm's ResNetV2 makes every "
                f"GroupNorm with 32 groups (norm_layer='groupnorm') and a config cannot set another count; "
                f"{TIMM_INSTEAD}, or pretrain with groups=32 and a width whose channel counts are multiples of 32")
    basic = not DEPTHS[bb.depth][2]
    channels = [f["num_chs"] for f in net.feature_info[1:]]
    common = dict(channels=channels, stem_chs=net.stem.conv.out_channels, in_chans=bb.in_chans)
    if bb.depth == 50:
        notes = {"weight_standardization": "in the model: timm's StdConv2d (eps 1e-8), as pretrained"}
        return TimmSpec("resnetv2_50x1_bit", common, dict(net.state_dict()), notes)
    modules = dict(net.named_modules())
    state = {}
    for k, t in net.state_dict().items():
        owner = modules.get(k.rpartition(".")[0])
        state[k] = _standardized(owner) if isinstance(owner, TimmStdConv2d) and k.endswith(".weight") else t
    kwargs = dict(layers=[len(s.blocks) for s in net.stages], basic=basic, bottle_ratio=1.0 if basic else 0.25,
                  stem_type="fixed", norm_layer="groupnorm", **common)
    notes = {"weight_standardization": "folded into the weights of plain convolutions (same outputs; training "
                                       "further in timm does not standardise them)"}
    return TimmSpec("resnetv2_18" if basic else "resnetv2_50", kwargs, state, notes)
