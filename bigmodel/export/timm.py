"""``--format timm``: ``model.safetensors`` in timm's own layout and ``config.json`` with the timm
model name (``architecture``) and keyword arguments (``model_args``):
``timm.create_model(name, pretrained=False, **model_args)`` then ``load_state_dict`` — or simply
``timm.create_model("local-dir:FOLDER", pretrained=True)`` — computes what our backbone computes
(``forward_head(forward_features(x), pre_logits=True)`` are our pooled features), and with a class
head (supervised or fine-tuned checkpoints) ``model(x)`` gives its logits. Checked on a random
batch before anything is written.

Each architecture converts its own weights beside its definition (``to_timm`` in
``architectures/vit.py``, ``resnet.py``, ``timm_backbone.py``; timm's ``checkpoint_filter_fn``
pattern) and refuses there what timm cannot express, with the setting and the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from bigmodel.architectures import resnet, timm_backbone, vit
from bigmodel.architectures.base import TIMM_INSTEAD, Backbone, TimmSpec, no_timm
from bigmodel.export.config import TOLERANCE, config, random_batch
from bigmodel.loader import Pretrained

CONVERTERS: dict[str, Callable[[Backbone, dict[str, Any]], TimmSpec]] = {
    "vit": vit.to_timm, "resnet": resnet.to_timm, "timm": timm_backbone.to_timm}
NO_TIMM = {
    "lstm": "timm has no recurrent backbones",
    "igpt": "timm has no ImageGPT (a causal decoder over colour-cluster tokens with a palette)",
}


def timm_model(loaded: Pretrained) -> tuple[TimmSpec, nn.Module]:
    """The timm model name, kwargs and state dict of a checkpoint's backbone (with its class head
    when it has one), and the timm model built and loaded from them.

    Raises:
        ExportError: a setting timm cannot express, named with the reason.
    """
    name = loaded.architecture["name"]
    if name not in CONVERTERS:
        why = NO_TIMM.get(name, "no conversion to timm is defined for it")
        raise no_timm(f"architecture {name!r} has no timm counterpart ({why}); {TIMM_INSTEAD}")
    spec = CONVERTERS[name](loaded.backbone, loaded.architecture)
    spec.kwargs["num_classes"] = len(loaded.labels)
    model = timm.create_model(spec.name, pretrained=False, **spec.kwargs).eval()
    if loaded.head is not None:  # timm's classifier: a Linear, or ResNetV2's 1x1 convolution
        clf = model.get_classifier()
        prefix = next(n for n, m in model.named_modules() if m is clf)
        spec.state_dict[f"{prefix}.weight"] = loaded.head.weight.detach().reshape(clf.weight.shape)
        spec.state_dict[f"{prefix}.bias"] = loaded.head.bias.detach()
    spec.state_dict = {k: v.detach().contiguous() for k, v in spec.state_dict.items()}
    model.load_state_dict(spec.state_dict, strict=True)
    return spec, model


@torch.no_grad()
def difference(loaded: Pretrained, model: nn.Module, batch: int = 2) -> float:
    """Largest |difference| on a random batch between our pooled features and the timm model's
    ``forward_head(forward_features(x), pre_logits=True)`` (and the logits, with a head)."""
    x = random_batch(loaded.backbone, batch)
    ours = loaded.backbone(x)
    diff = (model.forward_head(model.forward_features(x), pre_logits=True) - ours).abs().max()
    if loaded.head is not None:
        diff = torch.maximum(diff, (model(x) - loaded.head(ours)).abs().max())
    return float(diff)


def write(loaded: Pretrained, folder: Path) -> dict[str, Any]:
    """Write ``model.safetensors`` into ``folder``; returns ``config.json``'s contents."""
    spec, model = timm_model(loaded)
    diff = difference(loaded, model)
    if diff > TOLERANCE:  # a conversion bug, never a user's mistake
        raise RuntimeError(f"timm model {spec.name} differs from the backbone by {diff:.3g} on a random batch")
    save_file(spec.state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})
    n = spec.kwargs["num_classes"]
    timm_cfg = {k: model.pretrained_cfg[k] for k in ("fixed_input_size", "first_conv", "classifier")
                if k in model.pretrained_cfg}
    cfg = config(loaded, "timm", n, timm_cfg, architecture=spec.name, model_args=spec.kwargs)
    cfg["bigmodel"].update(spec.notes, max_abs_difference=diff)
    return cfg
