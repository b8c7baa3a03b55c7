"""``config.json`` of every export, laid out as timm's Hugging Face configs are: ``num_classes``,
``num_features``, ``label_names``, ``pretrained_cfg`` (``input_size`` (C, H, W), ``mean``, ``std``,
``interpolation``, ``crop_pct``...), plus a ``bigmodel`` section: the recipe's ``architecture``
section, the checkpoint and its step, the objective, the training classes and how channels are
converted."""

from __future__ import annotations

from typing import Any

import torch

from bigmodel.architectures.base import Backbone
from bigmodel.data.transforms import MEAN, STD
from bigmodel.loader import FINETUNE, Pretrained

TOLERANCE = 1e-4  # largest |difference| an exported model may show against PyTorch on a random batch
CHANNELS = ("images with another channel count are converted before normalising: grey repeated to 3 "
            "channels, RGB averaged (unweighted) to 1, as bigmodel.data.transforms.to_input does")
RESIZE = ("bilinear resize (antialiased when shrinking) of the whole image to input_size; fine-tuned "
          "models: resize to input_size / crop_pct, then the centre input_size crop")


def preprocessing(loaded: Pretrained, num_classes: int) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` data fields for the exported weights: ``input_size`` (C, H, W),
    ``mean``/``std`` per channel (``(x / 255 - mean) / std``, :func:`~bigmodel.data.transforms.to_input`),
    ``interpolation``, ``crop_pct``/``crop_mode`` (1.0 = the whole image; a fine-tuned model tests on
    the centre ``crop`` of the image resized to ``resize``) and ``num_classes`` (the outputs of the
    exported weights: 0 for features)."""
    bb = loaded.backbone
    c, s = bb.in_chans, bb.image_size
    crop_pct = 1.0
    if loaded.kind == FINETUNE and loaded.objective.test_crop:
        sched = loaded.objective.schedule
        s, crop_pct = sched.crop, sched.crop / sched.resize
    return {"input_size": [c, s, s], "interpolation": "bilinear", "crop_pct": crop_pct, "crop_mode": "center",
            "mean": [MEAN] * c, "std": [STD] * c, "num_classes": num_classes}


def config(loaded: Pretrained, fmt: str, num_classes: int, pretrained_cfg: dict[str, Any],
           **extra: Any) -> dict[str, Any]:
    """``config.json``: timm's root fields and ``pretrained_cfg``, then the ``bigmodel`` section."""
    bb = loaded.backbone
    cfg: dict[str, Any] = {**extra, "num_classes": num_classes, "num_features": bb.feature_dim}
    if num_classes:
        cfg["label_names"] = list(loaded.labels)
    cfg["pretrained_cfg"] = {**pretrained_cfg, **preprocessing(loaded, num_classes)}
    cfg["bigmodel"] = {
        "format": fmt, "checkpoint": str(loaded.checkpoint), "step": loaded.step,
        "objective": loaded.kind, "architecture": loaded.architecture,
        "classes": list(loaded.labels) or list(loaded.classes),
        "channels": CHANNELS, "resize": RESIZE,
    }
    return cfg


def random_batch(bb: Backbone, n: int) -> torch.Tensor:
    """A seeded normal batch ``(n, in_chans, image_size, image_size)`` to check an export on."""
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, bb.in_chans, bb.image_size, bb.image_size, generator=g)
