"""``bigmodel export RUN_DIR|CKPT --format timm|onnx|safetensors``: a checkpoint's backbone in a form
other tools load, with the preprocessing that feeds it.

Every format writes one folder (default ``RUN_DIR/export/FORMAT``) holding the weights and a
``config.json`` laid out as timm's Hugging Face configs are (``num_classes``, ``num_features``,
``pretrained_cfg`` with ``input_size`` (C, H, W), ``mean``, ``std``, ``interpolation``,
``crop_pct``...), plus a ``bigmodel`` section: the recipe's ``architecture`` section, the
checkpoint and its step, the objective, the training classes and how channels are converted.

- ``timm``: ``model.safetensors`` in timm's own layout and ``config.json`` with the timm model name
  (``architecture``) and keyword arguments (``model_args``):
  ``timm.create_model(name, pretrained=False, **model_args)`` then ``load_state_dict`` — or simply
  ``timm.create_model("local-dir:FOLDER", pretrained=True)`` — computes what our backbone computes
  (``forward_head(forward_features(x), pre_logits=True)`` are our pooled features), and with a
  class head (supervised or fine-tuned checkpoints) ``model(x)`` gives its logits. Checked on a
  random batch before anything is written. What timm cannot express is refused with the setting
  and the reason (:func:`timm_model`): a V-MoE (timm's ViT blocks have one dense MLP), the ResNet's
  small-image stem (every timm ResNetV2 stem ends in a stride-2 max-pool after a stride-2 conv), a
  ResNet GroupNorm with other than 32 groups (timm's ``norm_layer='groupnorm'`` has 32, and a JSON
  config cannot pass another count), and the ``lstm`` and ``igpt`` families.
- ``onnx``: ``backbone.onnx``, images ``(batch, C, H, W)`` normalised as ``pretrained_cfg`` says →
  pooled ``features`` ``(batch, feature_dim)``, the batch axis dynamic; exported by the
  ``torch.export``-based exporter (``dynamo=True``, the supported one in torch 2.9+; it refuses
  data-dependent shapes instead of silently freezing them as tracing does) and checked against
  PyTorch under onnxruntime at batch 1 and 3. V-MoE layers are exported in their evaluation form
  (no token dropped) by :class:`DenseMoE`.
- ``safetensors``: ``backbone.safetensors``, the backbone's weights alone (no objective heads) under
  our own names: ``build.backbone(config["bigmodel"]["architecture"])`` loads them.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import inspect
import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from bigmodel.architectures.base import Backbone
from bigmodel.data.transforms import MEAN, STD, to_input
from bigmodel.recipe import RecipeError
from bigmodel.train import checkpoint

FORMATS = ("timm", "onnx", "safetensors")
TOLERANCE = 1e-4  # largest |difference| an exported model may show against PyTorch on a random batch
CHANNELS = ("images with another channel count are converted before normalising: grey repeated to 3 "
            "channels, RGB averaged (unweighted) to 1, as bigmodel.data.transforms.to_input does")
RESIZE = ("bilinear resize (antialiased when shrinking) of the whole image to input_size; fine-tuned "
          "models: resize to input_size / crop_pct, then the centre input_size crop")


# --------------------------------------------------------------------------------------------------
# A checkpoint rebuilt from its folder alone


@dataclasses.dataclass
class Loaded:
    """A checkpoint rebuilt without its training data, in eval mode on the CPU.

    Attributes:
        model: the objective (pretraining checkpoints) or the fine-tuned
            :class:`~bigmodel.transfer.finetune.Classifier`; the backbone is ``model.backbone``.
        ckpt: the checkpoint folder used (a run directory's latest intact one).
        meta: its ``meta.json``.
        architecture: the recipe section that builds the backbone.
        objective: the pretraining objective's name, or ``finetune``.
        classes: the names of the class head's outputs (``[]`` without a head); the label index as
            a string where the training data named none.
    """

    model: nn.Module
    ckpt: Path
    meta: dict[str, Any]
    architecture: dict[str, Any]
    objective: str
    classes: list[str]

    @property
    def backbone(self) -> Backbone:
        return self.model.backbone

    @property
    def head(self) -> nn.Linear | None:
        """The class head (``feature_dim → len(classes)``), or ``None`` for a checkpoint without one."""
        return self.model.head if self.classes else None

    def test_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` → the float input the model was evaluated on: :func:`to_input` at the
        backbone's size, or a fine-tuned model's own test view (its centre crop)."""
        if self.objective == "finetune":
            return self.model.test_input(images)
        return to_input(images, self.backbone.image_size, self.backbone.in_chans)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, C, S, S)`` → class logits ``(B, len(classes))``."""
        return self.head(self.backbone(x))


def load(source: str | Path) -> Loaded:
    """Rebuild the model of a run directory (its latest intact checkpoint) or of a checkpoint folder:
    a pretraining checkpoint through :func:`bigmodel.analysis.figures.load_objective`, a fine-tuned
    one (``meta.json`` with ``finetune``) as its classifier.

    Raises:
        RecipeError: no such folder, no intact checkpoint, or one that cannot be rebuilt.
    """
    from bigmodel.analysis.figures import load_objective
    from bigmodel.registry import OBJECTIVES

    path = Path(source)
    if not path.exists():
        raise RecipeError(f"{source}: no such run directory or checkpoint folder")
    found = checkpoint.latest(path)
    if found is None:
        raise checkpoint.CheckpointError(f"{source}: no checkpoint (expected a run directory or checkpoints/step_*)")
    meta = checkpoint.load_meta(found)
    if "recipe" in meta:
        model, found, recipe = load_objective(found)
        head = getattr(model, "head", None)
        labelled = OBJECTIVES.get(recipe.objective.name).needs_labels and isinstance(head, nn.Linear)
        classes = _names(meta, head.out_features) if labelled else []
        return Loaded(model.cpu().eval(), found, meta, dict(recipe.raw["architecture"]), recipe.objective.name, classes)
    if "finetune" in meta:
        return _load_finetuned(found, meta)
    raise checkpoint.CheckpointError(f"{found}: meta.json holds neither a recipe (pretraining) nor a fine-tune "
                                     f"schedule; is it a bigmodel checkpoint?")


def _names(meta: dict[str, Any], n: int) -> list[str]:
    """The training data's class names when meta records all ``n``, else the label indices."""
    names = [str(c) for c in meta.get("classes") or []]
    return names if len(names) == n else [str(i) for i in range(n)]


def _load_finetuned(found: Path, meta: dict[str, Any]) -> Loaded:
    """A fine-tuned classifier from its checkpoint: the backbone from the recorded architecture
    section, the head from ``num_classes``, the test view from the schedule."""
    from safetensors import safe_open

    from bigmodel.recipe import _component
    from bigmodel.registry import ARCHITECTURES
    from bigmodel.train import build
    from bigmodel.transfer.finetune import Classifier, Schedule

    section = meta.get("architecture")
    if not section:
        raise checkpoint.CheckpointError(
            f"{found}: this fine-tune checkpoint does not record the architecture of its backbone (meta.json has "
            f"no 'architecture': the fine-tuned backbone did not carry its recipe section), so it cannot be rebuilt")
    net = build.backbone(_component("architecture", section, ARCHITECTURES))
    ft = meta["finetune"]
    schedule = Schedule(**{**ft["schedule"], "decay_steps": tuple(ft["schedule"]["decay_steps"])})
    num_classes = meta.get("num_classes")
    if num_classes is None:  # the head's rows
        with safe_open(str(found / "model.safetensors"), "pt") as f:
            num_classes = f.get_slice("head.weight").get_shape()[0]
    model = Classifier(net, int(num_classes), schedule, flip=ft.get("flip", False), test_crop=ft.get("test_crop", True))
    checkpoint.load_weights(found, model)
    return Loaded(model.eval(), found, meta, dict(section), "finetune", _names(meta, int(num_classes)))


# --------------------------------------------------------------------------------------------------
# Preprocessing (timm's pretrained_cfg)


def preprocessing(loaded: Loaded, num_classes: int) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` data fields for the exported weights: ``input_size`` (C, H, W),
    ``mean``/``std`` per channel (``(x / 255 - mean) / std``, :func:`to_input`), ``interpolation``,
    ``crop_pct``/``crop_mode`` (1.0 = the whole image; a fine-tuned model tests on the centre
    ``crop`` of the image resized to ``resize``) and ``num_classes`` (the outputs of the exported
    weights: 0 for features)."""
    bb = loaded.backbone
    c, s = bb.in_chans, bb.image_size
    crop_pct = 1.0
    if loaded.objective == "finetune" and loaded.model.test_crop:
        sched = loaded.model.schedule
        s, crop_pct = sched.crop, sched.crop / sched.resize
    return {"input_size": [c, s, s], "interpolation": "bilinear", "crop_pct": crop_pct, "crop_mode": "center",
            "mean": [MEAN] * c, "std": [STD] * c, "num_classes": num_classes}


def _config(loaded: Loaded, fmt: str, num_classes: int, pretrained_cfg: dict[str, Any],
            **extra: Any) -> dict[str, Any]:
    """``config.json``: timm's root fields and ``pretrained_cfg``, then the ``bigmodel`` section."""
    bb = loaded.backbone
    cfg: dict[str, Any] = {**extra, "num_classes": num_classes, "num_features": bb.feature_dim}
    if num_classes:
        cfg["label_names"] = list(loaded.classes)
    cfg["pretrained_cfg"] = {**pretrained_cfg, **preprocessing(loaded, num_classes)}
    cfg["bigmodel"] = {
        "format": fmt, "checkpoint": str(loaded.ckpt), "step": loaded.meta.get("step"),
        "objective": loaded.objective, "architecture": loaded.architecture,
        "classes": list(loaded.classes) or list(loaded.meta.get("classes") or []),
        "channels": CHANNELS, "resize": RESIZE,
    }
    return cfg


# --------------------------------------------------------------------------------------------------
# timm


@dataclasses.dataclass
class TimmModel:
    """A timm model that holds a backbone: ``timm.create_model(name, pretrained=False, **kwargs)``
    and ``load_state_dict(state_dict)``; ``notes`` say what differs in form (not in outputs)."""

    name: str
    kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    notes: dict[str, str]


# our ViT sizes → the timm entry point of the same width/depth/heads (nano and micro have none: the
# entry point only picks timm's VisionTransformer, every size argument is given explicitly)
VIT_NAMES = {"tiny": "vit_tiny_patch16_224", "small": "vit_small_patch16_224",
             "base": "vit_base_patch16_224", "large": "vit_large_patch16_224"}
RESNET_STEMS = "'', 'fixed', 'same', 'deep', 'deep_fixed', 'deep_same', 'tiered'"
NO_TIMM = {
    "lstm": "timm has no recurrent backbones",
    "igpt": "timm has no ImageGPT (a causal decoder over colour-cluster tokens with a palette)",
}
INSTEAD = "use --format onnx or safetensors"


def _refuse(why: str) -> RecipeError:
    return RecipeError(f"export --format timm: {why}")


def _timm_vit(bb: Backbone, section: dict[str, Any]) -> TimmModel:
    """Our ViT is timm's VisionTransformer (class token, learned position embeddings over class and
    patch tokens, pre-norm blocks with GELU MLPs and a fused qkv, final LayerNorm, no ``fc_norm``):
    the same module tree, so the state dict only loses our ``vit.`` prefix. ``global_pool: avg``
    pools the patch tokens after the final norm, which is timm's ``global_pool='avg'`` with
    ``fc_norm=False`` (timm's default for avg would move the norm after pooling)."""
    if bb.moe_blocks:
        moe = bb.vit.blocks[bb.moe_blocks[0]].mlp.cfg
        blocks = ", ".join(str(i + 1) for i in bb.moe_blocks)
        raise _refuse(f"architecture.moe: blocks {blocks} of {len(bb.vit.blocks)} are mixture-of-experts MLPs "
                      f"({moe.experts} experts behind a router, top-{moe.top_k} routing); timm's VisionTransformer has "
                      f"one dense MLP per block, so no timm model holds these weights; {INSTEAD}")
    v = bb.vit
    kwargs = dict(img_size=bb.image_size, patch_size=bb.patch_size, in_chans=bb.in_chans, embed_dim=v.embed_dim,
                  depth=len(v.blocks), num_heads=v.blocks[0].attn.num_heads, class_token=True,
                  global_pool=bb.global_pool, fc_norm=False)
    state = {k.removeprefix("vit."): t for k, t in bb.state_dict().items()}
    return TimmModel(VIT_NAMES.get(section.get("size"), VIT_NAMES["tiny"]), kwargs, state, {})


def _standardized(conv: nn.Conv2d) -> torch.Tensor:
    """The weight a ``StdConv2d`` convolves with: standardised per output channel, exactly as its
    forward computes it."""
    w = conv.weight.detach()
    return F.batch_norm(w.reshape(1, conv.out_channels, -1), None, None, training=True, momentum=0.0,
                        eps=conv.eps).reshape_as(w)


def _timm_resnet(bb: Backbone, section: dict[str, Any]) -> TimmModel:
    """Our ResNet is timm's ResNetV2 with BiT's settings. Depth 50 is timm's ``resnetv2_50x1_bit``
    (weight-standardised convolutions with BiT's epsilon 1e-8) with our widths. Depths 18 and 26 have
    no timm entry point with weight-standardised convolutions whose blocks can be set by keyword (the
    ``_bit`` entry points fix 50/101/152 layers, and a JSON config cannot name a convolution class), so
    they are ``resnetv2_18`` / ``resnetv2_50`` with our blocks, GroupNorm and plain convolutions that
    hold the standardised weights: the same outputs, but further training in timm would not
    standardise them."""
    from timm.layers import GroupNormAct, StdConv2d

    from bigmodel.architectures.resnet import DEPTHS

    net = bb.net
    if not hasattr(net.stem, "pool"):
        conv = net.stem.conv
        raise _refuse(
            f"architecture.stem={section.get('stem', 'auto')!r} at image_size={bb.image_size} is the small-image stem "
            f"(one {conv.kernel_size[0]}x{conv.kernel_size[0]} stride-{conv.stride[0]} convolution, no max-pool); "
            f"timm's ResNetV2 has no such stem: each of its stem_type values ({RESNET_STEMS}) is a stride-2 "
            f"convolution followed by a stride-2 max-pool (input / 4), and a config cannot replace it; {INSTEAD}, "
            f"or pretrain with architecture.stem=bit")
    for name, m in net.named_modules():
        if isinstance(m, GroupNormAct) and m.num_groups != 32:
            raise _refuse(
                f"architecture.groups={section.get('groups', 32)}, width={section.get('width', 1.0)}: the GroupNorm "
                f"{name} over {m.num_channels} channels has {m.num_groups} groups; timm's ResNetV2 makes every "
                f"GroupNorm with 32 groups (norm_layer='groupnorm') and a config cannot set another count; {INSTEAD}, "
                f"or pretrain with groups=32 and a width whose channel counts are multiples of 32")
    basic = not DEPTHS[bb.depth][2]
    channels = [f["num_chs"] for f in net.feature_info[1:]]
    common = dict(channels=channels, stem_chs=net.stem.conv.out_channels, in_chans=bb.in_chans)
    if bb.depth == 50:
        notes = {"weight_standardization": "in the model: timm's StdConv2d (eps 1e-8), as pretrained"}
        return TimmModel("resnetv2_50x1_bit", common, dict(net.state_dict()), notes)
    modules = dict(net.named_modules())
    state = {}
    for k, t in net.state_dict().items():
        owner = modules.get(k.rpartition(".")[0])
        state[k] = _standardized(owner) if isinstance(owner, StdConv2d) and k.endswith(".weight") else t
    kwargs = dict(layers=[len(s.blocks) for s in net.stages], basic=basic, bottle_ratio=1.0 if basic else 0.25,
                  stem_type="fixed", norm_layer="groupnorm", **common)
    notes = {"weight_standardization": "folded into the weights of plain convolutions (same outputs; training "
                                       "further in timm does not standardise them)"}
    return TimmModel("resnetv2_18" if basic else "resnetv2_50", kwargs, state, notes)


def _timm_timm(bb: Backbone, section: dict[str, Any]) -> TimmModel:
    """A ``timm`` backbone is a timm model already (``bb.model``): the section's model name and
    keyword arguments, with ``img_size`` where the model's class takes one."""
    kwargs = {"in_chans": bb.in_chans, **(section.get("model_kwargs") or {})}
    if "img_size" in inspect.signature(type(bb.model).__init__).parameters:
        kwargs["img_size"] = bb.image_size
    state = {k.removeprefix("model."): t for k, t in bb.state_dict().items()}
    return TimmModel(section["model"], kwargs, state, {})


TIMM_CONVERTERS = {"vit": _timm_vit, "resnet": _timm_resnet, "timm": _timm_timm}


def timm_model(loaded: Loaded) -> tuple[TimmModel, nn.Module]:
    """The timm model name, kwargs and state dict of a checkpoint's backbone (with its class head
    when it has one), and the timm model built and loaded from them.

    Raises:
        RecipeError: a setting timm cannot express, named with the reason.
    """
    import timm

    name = loaded.architecture["name"]
    if name not in TIMM_CONVERTERS:
        why = NO_TIMM.get(name, "no conversion to timm is defined for it")
        raise _refuse(f"architecture {name!r} has no timm counterpart ({why}); {INSTEAD}")
    spec = TIMM_CONVERTERS[name](loaded.backbone, loaded.architecture)
    spec.kwargs["num_classes"] = len(loaded.classes)
    model = timm.create_model(spec.name, pretrained=False, **spec.kwargs).eval()
    if loaded.head is not None:  # timm's classifier: a Linear, or ResNetV2's 1x1 convolution
        clf = model.get_classifier()
        prefix = next(n for n, m in model.named_modules() if m is clf)
        spec.state_dict[f"{prefix}.weight"] = loaded.head.weight.detach().reshape(clf.weight.shape)
        spec.state_dict[f"{prefix}.bias"] = loaded.head.bias.detach()
    spec.state_dict = {k: v.detach().contiguous() for k, v in spec.state_dict.items()}
    model.load_state_dict(spec.state_dict, strict=True)
    return spec, model


def _random_batch(bb: Backbone, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    return torch.randn(n, bb.in_chans, bb.image_size, bb.image_size, generator=g)


@torch.no_grad()
def timm_difference(loaded: Loaded, model: nn.Module, batch: int = 2) -> float:
    """Largest |difference| on a random batch between our pooled features and the timm model's
    ``forward_head(forward_features(x), pre_logits=True)`` (and the logits, with a head)."""
    x = _random_batch(loaded.backbone, batch)
    ours = loaded.backbone(x)
    diff = (model.forward_head(model.forward_features(x), pre_logits=True) - ours).abs().max()
    if loaded.head is not None:
        diff = torch.maximum(diff, (model(x) - loaded.head(ours)).abs().max())
    return float(diff)


def _write_timm(loaded: Loaded, folder: Path) -> dict[str, Any]:
    spec, model = timm_model(loaded)
    diff = timm_difference(loaded, model)
    if diff > TOLERANCE:  # a conversion bug, never a user's mistake
        raise RuntimeError(f"timm model {spec.name} differs from the backbone by {diff:.3g} on a random batch")
    save_file(spec.state_dict, str(folder / "model.safetensors"), metadata={"format": "pt"})
    n = spec.kwargs["num_classes"]
    timm_cfg = {k: model.pretrained_cfg[k] for k in ("fixed_input_size", "first_conv", "classifier")
                if k in model.pretrained_cfg}
    cfg = _config(loaded, "timm", n, timm_cfg, architecture=spec.name, model_args=spec.kwargs)
    cfg["bigmodel"].update(spec.notes, max_abs_difference=diff)
    return cfg


# --------------------------------------------------------------------------------------------------
# ONNX


class DenseMoE(nn.Module):
    """A :class:`~bigmodel.architectures.moe.MoEMlp` in its evaluation form with shapes that do not
    depend on the routing: every expert runs on every token, and each token's output is the
    gate-weighted sum of its ``top_k`` experts (the others weighted 0) — the function of
    ``MoEMlp.forward_all_choices`` (no token dropped), which itself splits the tokens by expert counts
    read on the host, something an ONNX graph cannot hold. Costs ``experts / top_k`` times the
    expert compute; shares the router's and experts' weights."""

    def __init__(self, moe: nn.Module):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) → (B, N, D)``."""
        tokens = x.reshape(-1, x.shape[-1])
        probs, gate, expert = self.moe.choose(tokens)  # the MoE's own routing rule
        combine = torch.zeros_like(probs).scatter(-1, expert, gate).to(tokens.dtype)  # (S, E), top_k nonzero
        out = torch.stack([mlp(tokens) for mlp in self.moe.experts], 1)  # (S, E, D)
        return (out * combine[..., None]).sum(1).view_as(x)


def exportable(backbone: Backbone) -> nn.Module:
    """A CPU eval copy of ``backbone`` whose mixture-of-experts MLPs are :class:`DenseMoE`."""
    from bigmodel.architectures.moe import MoEMlp

    net = copy.deepcopy(backbone).cpu().eval()
    for name, m in list(net.named_modules()):
        if isinstance(m, MoEMlp):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, DenseMoE(m))
    return net


def onnx_difference(path: Path, net: nn.Module, batches: tuple[int, ...] = (1, 3)) -> float | None:
    """Largest |difference| between onnxruntime and PyTorch on random batches of each size, from
    the one file; ``None`` without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for b in batches:
        x = _random_batch(net, b)
        with torch.no_grad():
            ref = net(x).numpy()
        out = session.run(None, {"images": x.numpy()})[0]
        if out.shape != ref.shape:
            raise RuntimeError(f"{path}: batch {b} gave features {out.shape}, PyTorch {ref.shape}")
        worst = max(worst, float(abs(out - ref).max()))
    return worst


def _write_onnx(loaded: Loaded, folder: Path) -> dict[str, Any]:
    for package in ("onnx", "onnxscript"):
        if importlib.util.find_spec(package) is None:
            raise RecipeError(f"export --format onnx needs the {package} package: pip install 'bigmodel[onnx]'")
    net = exportable(loaded.backbone)
    path = folder / "backbone.onnx"
    large = sum(p.numel() * p.element_size() for p in net.parameters()) > 1.5 * 2**30  # protobuf's 2 GiB limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (_random_batch(net, 2),), str(path), dynamo=True, input_names=["images"],
                              output_names=["features"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=large, verbose=False)
    except Exception as e:  # noqa: BLE001  (the exporter raises many kinds; the user gets its first line)
        first = (str(e).strip().splitlines() or [""])[0]
        raise RecipeError(f"export --format onnx: torch.onnx cannot export architecture "
                          f"{loaded.architecture['name']!r}: {type(e).__name__}: {first}") from e
    diff = onnx_difference(path, net)
    if diff is not None and diff > TOLERANCE:
        raise RuntimeError(f"{path}: onnxruntime differs from PyTorch by {diff:.3g} on a random batch")
    cfg = _config(loaded, "onnx", 0, {"fixed_input_size": True})
    import onnx

    cfg["bigmodel"]["onnx"] = {
        "input": "images", "output": "features", "dynamic_axes": {"images": [0], "features": [0]},
        "opset": next((o.version for o in onnx.load(str(path), load_external_data=False).opset_import
                       if o.domain in ("", "ai.onnx")), None),
        "max_abs_difference": diff if diff is not None else "not checked: onnxruntime is not installed",
    }
    return cfg


# --------------------------------------------------------------------------------------------------
# safetensors, and the command


def _write_safetensors(loaded: Loaded, folder: Path) -> dict[str, Any]:
    weights = {k: v.detach().contiguous() for k, v in loaded.backbone.state_dict().items()}
    save_file(weights, str(folder / "backbone.safetensors"), metadata={"format": "pt"})
    return _config(loaded, "safetensors", 0, {})


WRITERS = {"timm": _write_timm, "onnx": _write_onnx, "safetensors": _write_safetensors}


def export(source: str | Path, fmt: str, out: str | Path | None = None) -> dict[str, Any]:
    """Export the backbone of ``source`` (a run directory or a checkpoint folder) as ``fmt`` into
    the folder ``out`` (default ``RUN_DIR/export/FORMAT``): weights and ``config.json``.

    Everything is built and checked in a temporary folder first, so a refusal or a failure writes
    nothing; files already in ``out`` with the same names are replaced.

    Returns:
        ``{"format", "out", "files", "config"}``.

    Raises:
        RecipeError: an unknown format, a checkpoint that cannot be loaded, or a setting the format
            cannot express (one line naming it).
    """
    from bigmodel.api import run_dir_of

    if fmt not in FORMATS:
        raise RecipeError(f"export --format {fmt!r}: unknown format; valid: {', '.join(FORMATS)}")
    loaded = load(source)
    folder = Path(out) if out is not None else run_dir_of(loaded.ckpt) / "export" / fmt
    if folder.exists() and not folder.is_dir():
        raise RecipeError(f"export --out {folder}: exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f"bigmodel-export-{fmt}-"))
    try:
        with torch.no_grad():
            cfg = WRITERS[fmt](loaded, tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for f in sorted(tmp.iterdir()):
            shutil.move(f, folder / f.name)
            files.append(str(folder / f.name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"format": fmt, "out": str(folder), "files": files, "config": cfg}
