"""``--format onnx``: one ONNX model, images ``(batch, C, H, W)`` normalised as ``pretrained_cfg``
says → ``logits`` ``(batch, num_classes)`` and ``features`` ``(batch, feature_dim)`` for a checkpoint
with a class head (a supervised run, a fine-tune: the classifier, as the timm export carries it),
``features`` alone otherwise; the batch axis dynamic.

Exported by the ``torch.export``-based exporter (``dynamo=True``, the supported one in torch 2.9+;
it refuses data-dependent shapes instead of silently freezing them as tracing does) and checked
against PyTorch under onnxruntime at batch 1 and 3. V-MoE layers are exported in their evaluation
form (no token dropped) by :class:`~bigmodel.architectures.moe.DenseMoE`.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.architectures.moe import densified
from bigmodel.errors import ExportError
from bigmodel.export.config import TOLERANCE, config, random_batch
from bigmodel.loader import Pretrained

FEATURES = "backbone.onnx"  # default file name: features only
CLASSIFIER = "model.onnx"  # default file name: logits and features


class Classifier(nn.Module):
    """``x → (logits, features)``: the backbone's pooled features and the class head on them."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        return self.head(features), features


def exportable(loaded: Pretrained) -> tuple[nn.Module, list[str]]:
    """A CPU eval copy of the checkpoint's backbone (with its class head where it has one) whose
    mixture-of-experts MLPs are dense, and the names of its outputs."""
    net = densified(copy.deepcopy(loaded.backbone).cpu().eval())
    if loaded.head is None:
        return net, ["features"]
    return Classifier(net, copy.deepcopy(loaded.head).cpu()).eval(), ["logits", "features"]


def difference(path: Path, net: nn.Module, backbone: nn.Module, batches: tuple[int, ...] = (1, 3)) -> float | None:
    """Largest |difference| between onnxruntime and PyTorch over every output, on random batches of
    each size, from the one file; ``None`` without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in batches:
        x = random_batch(backbone, b)
        with torch.no_grad():
            ref = net(x)
        refs = ref if isinstance(ref, tuple) else (ref,)
        outs = session.run(None, {"images": x.numpy()})
        for out, r in zip(outs, refs, strict=True):
            if out.shape != tuple(r.shape):
                raise RuntimeError(f"{path}: batch {b} gave an output of shape {out.shape}, PyTorch {tuple(r.shape)}")
            worst = max(worst, float(abs(out - r.numpy()).max()))
    return worst


def write(loaded: Pretrained, folder: Path, filename: str | None = None) -> dict[str, Any]:
    """Write the ONNX model into ``folder`` as ``filename`` (default: ``model.onnx`` with a class
    head, else ``backbone.onnx``); returns ``config.json``'s contents."""
    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise ExportError(f"export --format onnx needs the {package} package: pip install 'bigmodel[onnx]'")
    net, outputs = exportable(loaded)
    path = folder / (filename or (CLASSIFIER if loaded.head is not None else FEATURES))
    large = sum(p.numel() * p.element_size() for p in net.parameters()) > 1.5 * 2**30  # protobuf's 2 GiB limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (random_batch(loaded.backbone, 2),), str(path), dynamo=True, input_names=["images"],
                              output_names=outputs, dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=large, verbose=False)
    except Exception as e:  # noqa: BLE001  (the exporter raises many kinds; the user gets its first line)
        first = (str(e).strip().splitlines() or [""])[0]
        raise ExportError(f"export --format onnx: torch.onnx cannot export architecture "
                          f"{loaded.architecture['name']!r}: {type(e).__name__}: {first}") from e
    diff = difference(path, net, loaded.backbone)
    if diff is not None and diff > TOLERANCE:
        raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {diff:.3g} on a random batch")
    cfg = config(loaded, "onnx", len(loaded.labels) if loaded.head is not None else 0, {"fixed_input_size": True})
    import onnx

    cfg["bigmodel"]["onnx"] = {
        "file": path.name, "input": "images", "outputs": outputs,
        "dynamic_axes": {name: [0] for name in ["images", *outputs]},
        "opset": next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")), None),
        "max_abs_difference": diff if diff is not None else "not checked: onnxruntime is not installed",
    }
    return cfg
