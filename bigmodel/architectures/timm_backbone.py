"""Any timm model as a backbone: ``architecture: {name: timm, model: <timm name>, ...}``.

The model is ``timm.create_model(model, pretrained=False, num_classes=0, in_chans=in_chans,
img_size=image_size, **model_kwargs)`` (``img_size`` only where the model takes one: ViT, Swin...;
convolutional nets run at any size). Weights are never downloaded. The backbone interface maps onto
timm's own: :meth:`forward_features` is timm's ``forward_features`` (a ``(B, C, H, W)`` map for CNNs,
``(B, N, D)`` tokens for ViTs; NHWC outputs such as Swin's are turned NCHW), :meth:`pool` is timm's
``forward_head(..., pre_logits=True)``, :meth:`block_features` reads ``forward_intermediates``.

What it can serve. Every timm model serves the objectives that need only pooled features
(``supervised``, ``simclr``). The ``tokens`` capability of MAE (drop patches before the encoder)
is given to timm's ``VisionTransformer`` family (``vit_*``, ``deit_*``, ...) with a class token:
:meth:`forward_visible` runs timm's patch embedding and position embedding, keeps the chosen
patches and runs the blocks on those alone. Other models (ConvNeXt, Swin, ResNet...) have no such
path and are refused with a message saying so (:meth:`TimmBackbone.why_not`).

Checked before anything is built: the name is a timm model, and the section builds and runs. Both
happen while the recipe is validated, on PyTorch's ``meta`` device (shapes only: no memory, no
compute, no weights, no random numbers drawn), so a typo or a size the model cannot take is one
recipe error and no run directory is written.
"""

from __future__ import annotations

import difflib
import inspect
import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated, Any

import timm
import torch
from pydantic import AfterValidator, Field, ValidationInfo
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from bigmodel.architectures.base import TOKENS, Backbone, TimmSpec
from bigmodel.registry import ARCHITECTURES

# Keys the recipe sets itself; in model_kwargs they would contradict it.
RESERVED = {
    "pretrained": "weights are never downloaded (pretrained=False always)",
    "num_classes": "the backbone has no classifier (num_classes=0); heads belong to objectives",
    "in_chans": "set architecture.in_chans",
    "img_size": "set architecture.image_size",
}
TOKEN_MODELS = "a timm VisionTransformer with a class token (e.g. deit_tiny_patch16_224, vit_tiny_patch16_224)"


def _known_model(name: str) -> str:
    """The recipe's ``model``: a name timm's registry knows (``timm.is_model``)."""
    if timm.is_model(name):
        return name
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    stem = name.split(".")[0].split("_")[0] or name
    similar = f" (similar: {', '.join(close)})" if close else ""
    raise ValueError(f"unknown timm model{similar}; list names with timm.list_models('*{stem}*')")


def _create(model: str, image_size: int, in_chans: int, model_kwargs: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` with ``img_size`` where the model accepts it.

    Whether a model takes ``img_size`` is known only to its class, so it is offered first and
    dropped when the constructor refuses that keyword (which it does before making any layer).
    Any other refusal (a misspelt key in ``model_kwargs``, a width the heads do not divide)
    becomes a ValueError naming the model.
    """
    common = dict(pretrained=False, num_classes=0, in_chans=in_chans, **model_kwargs)
    try:
        try:
            return timm.create_model(model, img_size=image_size, **common)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
            return timm.create_model(model, **common)
    except (TypeError, ValueError, AssertionError) as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"timm model {model!r} does not build with model_kwargs={model_kwargs}: {why}") from None


@dataclass(frozen=True)
class Probe:
    """What a timm section builds, found on the meta device (see :func:`probe`)."""

    cls: str  # the timm class, e.g. "ConvNeXt"
    feature_dim: int  # width of forward_head(..., pre_logits=True)
    tokens: str | None  # None when forward_visible applies, else why not


@lru_cache(maxsize=64)
def _probe(model: str, image_size: int, in_chans: int, kwargs_json: str) -> Probe:
    model_kwargs = json.loads(kwargs_json)
    for key in model_kwargs:
        if key in RESERVED:
            raise ValueError(f"model_kwargs.{key} cannot be set: {RESERVED[key]}")
    with torch.device("meta"), torch.no_grad():
        net = _create(model, image_size, in_chans, model_kwargs).eval()
        x = torch.empty(1, in_chans, image_size, image_size)
        try:
            feature_dim = net.forward_head(net.forward_features(x), pre_logits=True).shape[-1]
        except NotImplementedError:  # an operator without a meta kernel: shapes unknown, assume it runs
            feature_dim = getattr(net, "head_hidden_size", net.num_features)
        except (RuntimeError, AssertionError, ValueError) as e:
            why = " ".join(str(e).split())
            raise ValueError(f"timm model {model!r} ({type(net).__name__}) does not run on "
                             f"{in_chans}x{image_size}x{image_size} images ({why}); change architecture.image_size "
                             f"or the model's size in model_kwargs") from None
    return Probe(type(net).__name__, int(feature_dim), _why_no_tokens(net, model, image_size, int(feature_dim)))


def probe(model: str, image_size: int = 32, in_chans: int = 3, model_kwargs: dict[str, Any] | None = None) -> Probe:
    """Check a timm section and describe what it builds: the name is a timm model, ``model_kwargs``
    leaves the recipe's own keys alone, and the model, built on PyTorch's ``meta`` device, runs on
    one image of the given size (shapes only). Cached.

    Raises:
        ValueError: one line saying what is wrong (unknown name, a reserved or unknown key, a size
            the model cannot take, e.g. a ConvNeXt whose four stride-2 stages leave nothing of a
            28 px image).
    """
    _known_model(model)
    try:
        key = json.dumps(model_kwargs or {}, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"model_kwargs must hold plain YAML values (numbers, strings, lists, mappings): {e}") from None
    return _probe(model, image_size, in_chans, key)


def _why_no_tokens(net: nn.Module, model: str, image_size: int, feature_dim: int) -> str | None:
    """``None`` when :meth:`TimmBackbone.forward_visible` serves this model, else the reason."""
    what = f"timm model {model!r} ({type(net).__name__})"
    if not isinstance(net, VisionTransformer):
        return f"{what} has no patch tokens to drop; MAE needs {TOKEN_MODELS}, or architecture.name: vit"
    if net.cls_token is None:
        return f"{what} has no class token; MAE needs {TOKEN_MODELS}"
    p = net.patch_embed.patch_size
    if p[0] != p[1] or image_size % p[0] or getattr(net.patch_embed, "dynamic_img_pad", False):
        return f"{what}: MAE needs square patches that tile the image (patch {tuple(p)}, image {image_size})"
    if feature_dim != net.embed_dim:
        return (f"{what} projects its pooled features ({net.embed_dim} → {feature_dim}); "
                "MAE needs them at the token width")
    return None


def _buildable(model_kwargs: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
    """The section's last key: with the others validated, the whole section must build (meta)."""
    if "model" in info.data:  # else the name's own error is reported
        probe(info.data["model"], info.data.get("image_size", 32), info.data.get("in_chans", 3), model_kwargs)
    return model_kwargs


@ARCHITECTURES.register("timm")
class TimmBackbone(Backbone):
    """A timm model (``pretrained=False``, no classifier) behind the backbone interface.

    Args:
        model: a timm model name (``timm.list_models('*convnext*')`` lists some), e.g.
            ``convnext_atto``, ``deit_tiny_patch16_224``, ``swin_tiny_patch4_window7_224``.
        image_size: input side in pixels (given to the model as ``img_size`` where it takes one).
        in_chans: input channels (1 for grey, 3 for RGB).
        model_kwargs: further keyword arguments of the timm model, in timm's names, e.g.
            ``{dims: [16, 32, 64, 128], depths: [1, 1, 2, 1]}`` for a ConvNeXt or
            ``{patch_size: 4, embed_dim: 48, depth: 2, num_heads: 2}`` for a ViT/DeiT;
            ``drop_path_rate``, ``global_pool`` likewise.
    """

    def __init__(
        self,
        model: Annotated[str, AfterValidator(_known_model)],
        image_size: Annotated[int, Field(ge=8)] = 32,
        in_chans: Annotated[int, Field(ge=1)] = 3,
        model_kwargs: Annotated[dict[str, Any] | None, Field(validate_default=True), AfterValidator(_buildable)] = None,
    ):
        super().__init__()
        model_kwargs = dict(model_kwargs or {})
        info = probe(model, image_size, in_chans, model_kwargs)  # the recipe's checks, for direct use too
        self.model = _create(model, image_size, in_chans, model_kwargs)
        self.model_name = model
        self.feature_dim = info.feature_dim
        self.in_chans = in_chans
        self.image_size = image_size
        self.channels_last_output = getattr(self.model, "output_fmt", "NCHW") == "NHWC"  # Swin and kin
        self.has_tokens = info.tokens is None
        if self.has_tokens:
            self.patch_size = self.model.patch_embed.patch_size[0]
            self.num_patches = self.model.patch_embed.num_patches
        self._no_tokens = info.tokens
        # attention blocks (ViT, DeiT, Swin...) fine-tune as transformers; the rest as convnets
        self.family = "transformer" if any(hasattr(m, "attn") for m in self.model.modules()) else "convnet"

    def group_matcher(self, coarse: bool = False) -> dict[str, Any] | None:
        """The timm model's own grouping (where it has one) under our ``model.`` prefix."""
        if not hasattr(self.model, "group_matcher"):
            return None

        def prefixed(pattern: str) -> str:  # re.match anchors each pattern at the start already
            return r"model\.(?:" + pattern.removeprefix("^").replace("|^", "|") + ")"

        return {group: [(prefixed(p), suffix) for p, suffix in spec] if isinstance(spec, list | tuple)
                else prefixed(spec) for group, spec in self.model.group_matcher(coarse).items() if spec is not None}

    def no_weight_decay(self) -> set[str]:
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else set()
        return {f"model.{n}" for n in names}

    @classmethod
    def capabilities(cls, **cfg: Any) -> set[str]:
        """``tokens`` for ViT-family models with a class token; none for the others (and for an
        unnamed model, e.g. the default-settings compatibility table)."""
        return {TOKENS} if cls.why_not(TOKENS, **cfg) is None else set()

    @classmethod
    def why_not(cls, capability: str, **cfg: Any) -> str | None:
        """Why the section ``cfg`` lacks ``capability`` (one line naming the model and what would
        serve), or ``None`` when it has it."""
        if capability != TOKENS:
            return f"timm backbones provide {TOKENS} at most, not {capability}"
        if "model" not in cfg:
            return f"no timm model named; MAE needs {TOKEN_MODELS}"
        return probe(cfg["model"], cfg.get("image_size", 32), cfg.get("in_chans", 3), cfg.get("model_kwargs")).tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` → timm's features: tokens ``(B, N, D)`` (prefix tokens first) or a map
        ``(B, C', H', W')``."""
        f = self.model.forward_features(x)
        return f.permute(0, 3, 1, 2) if self.channels_last_output else f

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_head(features, pre_logits=True)`` → ``(B, feature_dim)``."""
        if self.channels_last_output:
            features = features.permute(0, 2, 3, 1)
        return self.model.forward_head(features, pre_logits=True)

    def forward_visible(self, x: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only some patch tokens (the MAE encoder), with timm's own layers.

        Args:
            x: images ``(B, C, H, W)``.
            ids_keep: ``(B, K)`` indices in ``[0, num_patches)`` of the patches to keep (row-major).

        Returns:
            ``(B, 1 + K, D)``: the class token, then the kept tokens in ``ids_keep`` order, after
            the final norm. Other prefix tokens (registers, DeiT's distillation token) go through
            the blocks and are left out of the output.
        """
        if not self.has_tokens:
            raise ValueError(self._no_tokens)
        v = self.model
        # timm's forward_features up to the blocks (its _pos_embed: prefix tokens and position
        # embeddings, in whichever layout the variant uses), with the patches chosen in between
        tokens = v._pos_embed(v.patch_embed(x))  # (B, P + N, D): prefix tokens, then patches
        p = v.num_prefix_tokens
        kept = tokens[:, p:].gather(1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))
        tokens = v.norm_pre(v.patch_drop(torch.cat([tokens[:, :p], kept], 1)))
        tokens = v.norm(v.blocks(tokens))
        return torch.cat([tokens[:, :1], tokens[:, p:]], 1)

    def block_features(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """timm's ``forward_intermediates``, pooled; the last entry equals ``self(x)``.

        ViTs: after each block (``block1`` … ``blockN``), final norm applied, pooled by
        ``forward_head`` as the features are. Other models: after each stage (``stage1`` …),
        globally average-pooled (``forward_head`` expects the last stage's width), the last stage
        replaced by the pooled final features. Models without ``forward_intermediates``: one entry.
        """
        m = self.model
        if isinstance(m, VisionTransformer):
            _, inter = m.forward_intermediates(x, norm=True, output_fmt="NLC", return_prefix_tokens=True)
            return [(f"block{i + 1}", m.forward_head(torch.cat([prefix, tokens], 1), pre_logits=True))
                    for i, (tokens, prefix) in enumerate(inter)]
        if not hasattr(m, "forward_intermediates"):
            return super().block_features(x)
        final, inter = m.forward_intermediates(x)
        out = [(f"stage{i + 1}", h.mean((2, 3))) for i, h in enumerate(inter)]
        out[-1] = (out[-1][0], m.forward_head(final, pre_logits=True))
        return out


def to_timm(bb: TimmBackbone, section: dict[str, Any]) -> TimmSpec:
    """A ``timm`` backbone is a timm model already (``bb.model``): the section's model name and
    keyword arguments, with ``img_size`` where the model's class takes one."""
    kwargs = {"in_chans": bb.in_chans, **(section.get("model_kwargs") or {})}
    if "img_size" in inspect.signature(type(bb.model).__init__).parameters:
        kwargs["img_size"] = bb.image_size
    state = {k.removeprefix("model."): t for k, t in bb.state_dict().items()}
    return TimmSpec(section["model"], kwargs, state)
