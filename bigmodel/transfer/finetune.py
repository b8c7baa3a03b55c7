"""Full fine-tuning with BiT-HyperRule (Kolesnikov et al., 2020, "Big Transfer (BiT)", arXiv:1912.11370;
the rule itself, a pure function of the task's size: :func:`bigmodel.transfer.hyperrule.hyperrule`).

A copy of the backbone gets a new zero-initialised linear head for the task (:class:`Classifier`,
an objective: views → ``{"loss", "acc"}``) and every weight is trained by the framework's one
training loop (:func:`bigmodel.train.trainer.fit`: the same step, autocast, non-finite check,
progress line, checkpoints and resume as pretraining). The caller's backbone is never touched.
Every value of the rule can be overridden by a protocol key; ``steps`` or ``schedule_scale`` shorten
the whole schedule proportionally (warm-up and decay steps included) for tests and CPU runs.

Four defaults differ from BiT: the learning rate (``base_lr`` 0.4 at batch 512; BiT's 0.003 leaves
schedules of a few hundred steps near chance), the batch (128: the published images in 4× the steps;
at 512 a short schedule leaves a small network short of updates), flips (off: a mirrored digit or letter is another
symbol) and the test view (``test_crop``: the centre of the image resized as in training, so objects
keep the training scale, as FixRes argues; BiT tests on the whole image at the crop size).

BiT's SGD suits its ResNets; transformers fine-tune the way MAE (He et al., 2022, appendix A.1) and
BEiT (Bao et al., 2022) do: AdamW, layer-wise lr decay (block ``i`` of ``L`` at ``lr · decay^(L+1-i)``,
timm's ``param_groups_layer_decay`` over the backbone's ``group_matcher``), weight decay 0.05 on the
matrices only, stochastic depth, gradient clipping. :data:`FAMILY_DEFAULTS` holds each family's
defaults (``Backbone.family``) in one place; every key is a protocol setting, so a recipe or ``--set``
overrides it. The schedule's length, warm-up and MixUp are BiT-HyperRule's for every family; its
decay (BiT's ÷10 steps or a cosine) and the training view (BiT's upscale-then-crop or the whole image)
are family keys; causal pixel-token backbones (igpt, a causal lstm) add iGPT's next-pixel loss
(``generative_weight``), and igpt fine-tunes through all its blocks (``feature_layer``), as iGPT does.
Measurements: ``benchmarks/results/finetune_lr.md``, ``finetune_families.md``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field
from rich.console import Console
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from bigmodel.architectures.base import Backbone
from bigmodel.data.base import TensorImages
from bigmodel.data.loader import batches
from bigmodel.errors import CheckpointError
from bigmodel.objectives.classifier import Classifier, Schedule, has_pixel_tokens
from bigmodel.registry import PROTOCOLS
from bigmodel.train import checkpoint
from bigmodel.train.metrics import read_metrics
from bigmodel.train.precision import autocast_dtype
from bigmodel.train.trainer import Loop, fit
from bigmodel.transfer.base import Protocol
from bigmodel.transfer.hyperrule import hyperrule

DEFAULT_BASE_LR = 0.4  # this protocol's default at batch 512 (0.1 at 128): benchmarks/results/finetune_lr.md
# Every family takes the published images in batches of 128, not BiT's 512: at 512 a short fine-tune is
# short of updates (MNIST, same images: a tiny ViT 97.36 → 98.14 %, pixel-lstm 97.89 → 98.59 %, a
# ResNet-18 ×0.25 from BYOL 97.50 → 99.23 %, its random init 97.93 → 99.10 %).
DEFAULT_BATCH = 128
# Each backbone family's fine-tuning defaults (``Backbone.family``: optimiser, schedule shape,
# training view), chosen by measurement (benchmarks/results/finetune_families.md); ``base_lr``: peak lr at
# batch 512, scaled linearly to the batch (``DEFAULT_BATCH``, the same for every family).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "convnet": {"optimizer": "sgd", "base_lr": DEFAULT_BASE_LR, "decay": "step",
                "weight_decay": 0.0, "layer_decay": 1.0, "drop_path": 0.0, "grad_clip": None, "bit_crop": True},
    "transformer": {"optimizer": "adamw", "base_lr": 8e-3, "decay": "cosine",
                    "weight_decay": 0.05, "layer_decay": 0.75, "drop_path": 0.1, "grad_clip": 1.0, "bit_crop": False},
    "recurrent": {"optimizer": "adamw", "base_lr": 8e-3, "decay": "cosine",
                  "weight_decay": 0.05, "layer_decay": 1.0, "drop_path": 0.0, "grad_clip": 1.0, "bit_crop": False},
}

@PROTOCOLS.register("finetune")
class Finetune(Protocol):
    """Args (``None`` = BiT-HyperRule's value for the task):
    steps: schedule length (published: 500 / 10k / 20k by task size, at batch 512).
    schedule_scale: multiplies the schedule length, warm-up and decay steps (e.g. 0.1 for a CPU run).
    batch_size: images per step (128 for every family; BiT used 512); without ``steps`` the published
        length is scaled to see the same images at any batch (:func:`hyperrule`).
    optimizer: ``sgd`` (BiT) or ``adamw`` (MAE/BEiT; betas 0.9, 0.999); the family's by default
        (:data:`FAMILY_DEFAULTS`, like every key below whose default says "family").
    base_lr: learning rate at batch 512, scaled linearly with ``batch_size`` (family; convnets 0.4:
        BiT's 0.003 leaves short schedules at chance, see benchmarks/results/finetune_lr.md).
    lr: peak learning rate (default: base_lr · batch_size / 512).
    warmup_steps: linear warm-up steps.
    decay: ``step`` (BiT: ×0.1 at ``decay_at``) or ``cosine`` (to zero at the last step: MAE, BEiT); family.
    decay_at: fractions of training at which the learning rate drops ×0.1 (published: steps
        200/300/400 of 500, 3k/6k/9k of 10k, 6k/12k/18k of 20k).
    mixup_alpha: MixUp's α, 0 = off (published: 0.1 from 20k training images).
    momentum: SGD momentum.
    weight_decay: weight decay (family; BiT: none); AdamW decays matrices only, not biases, norms,
        position embeddings or class tokens.
    layer_decay: layer-wise lr decay (family; 1 = off): the head trains at ``lr``, the top block
        (with the final norm) at ``lr · layer_decay``, each block below at ``layer_decay`` times the
        one above, the embeddings last. Needs grouped layers (``Backbone.group_matcher``: ViT, iGPT, timm's).
    drop_path: stochastic depth over the transformer blocks during fine-tuning (family).
    grad_clip: clip the global gradient norm (family; BiT: none).
    resize: training resize side before the random crop (published: image_size · 160/128).
    bit_crop: BiT's resize-then-random-crop (family: convnets); off, the image is resized to the
        backbone's size and not cropped (transformers: a ViT's position embeddings then see objects
        at the scale they were pretrained on; measured in benchmarks/results/finetune_families.md).
    translate: shift each training image by a random offset of up to ± this many pixels (reflect
        padding, then a crop back to size; 0 for every family, as measured). BiT's crop already
        shifts; this shifts without rescaling, for the view that keeps the backbone's size.
    flip: random horizontal flips in training (BiT flips every task; off by default here: a
        mirrored digit or letter is another symbol; turn on for natural images).
    test_crop: test on the centre crop of the image resized as in training, so that objects have
        the training scale (Touvron et al., 2019, "FixRes"); off: BiT's whole image at crop size.
    generative_weight: iGPT's joint objective L_CLF + w · L_GEN (Chen et al., 2020, §3.4; :class:`Classifier`)
        for igpt or a causal lstm over pixels; by default 1 for those (as iGPT), 0 = off for the rest.
    feature_layer: the blocks of igpt the fine-tune runs; by default all of them, as iGPT fine-tunes (the
        architecture's ``feature_layer``, the middle block by default, is where its frozen probes read).
    seed: data order, augmentation, MixUp and stochastic depth.
    precision: fp32, bf16 autocast, or auto (bf16 where the hardware runs it fast).
    deterministic: deterministic kernels on a GPU, so that a fine-tune gives the same bits every time
        it runs and when resumed (:func:`bigmodel.train.precision.deterministic`; the CPU's are already).
    eval_batch_size: images per forward pass at test time.
    checkpoint_dir: folder for checkpoints and metrics.jsonl (one sub-folder per fine-tune: starting
        weights, task data, schedule and settings, see :meth:`Finetune.identity`); a fine-tune killed
        there resumes from its last checkpoint when run again, and a sub-folder whose checkpoint
        records another fine-tune is refused, never resumed.
        Signals are left to the caller (``bigmodel run`` finishes the row in progress on SIGTERM).
    checkpoint_every: steps between checkpoints (default: a tenth of the schedule).
    """

    frozen = False

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1)] | None = None,
        schedule_scale: Annotated[float, Field(gt=0)] = 1.0,
        batch_size: Annotated[int, Field(ge=1)] = DEFAULT_BATCH,
        base_lr: Annotated[float, Field(gt=0)] | None = None,
        lr: Annotated[float, Field(gt=0)] | None = None,
        warmup_steps: Annotated[int, Field(ge=0)] | None = None,
        decay: Literal["step", "cosine"] | None = None,
        decay_at: tuple[Annotated[float, Field(ge=0, le=1)], ...] | None = None,
        mixup_alpha: Annotated[float, Field(ge=0)] | None = None,
        momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9,
        optimizer: Literal["sgd", "adamw"] | None = None,
        weight_decay: Annotated[float, Field(ge=0)] | None = None,
        layer_decay: Annotated[float, Field(gt=0, le=1)] | None = None,
        drop_path: Annotated[float, Field(ge=0, lt=1)] | None = None,
        grad_clip: Annotated[float, Field(gt=0)] | None = None,
        resize: Annotated[int, Field(ge=1)] | None = None,
        bit_crop: bool | None = None,
        translate: Annotated[int, Field(ge=0)] = 0,
        flip: bool = False,
        test_crop: bool = True,
        generative_weight: Annotated[float, Field(ge=0)] | None = None,
        feature_layer: Annotated[int, Field(ge=1)] | None = None,
        seed: int = 0,
        precision: Literal["fp32", "bf16", "auto"] = "fp32",
        deterministic: bool = False,
        eval_batch_size: Annotated[int, Field(ge=1)] = 256,
        checkpoint_dir: str | None = None,
        checkpoint_every: Annotated[int, Field(ge=1)] | None = None,
    ):
        self.steps = steps
        self.schedule_scale = schedule_scale
        self.batch_size = batch_size
        self.base_lr = base_lr
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.decay_at = None if decay_at is None else tuple(decay_at)
        self.mixup_alpha = mixup_alpha
        self.momentum = momentum
        self.optimizer = optimizer
        self.weight_decay = weight_decay
        self.layer_decay = layer_decay
        self.drop_path = drop_path
        self.grad_clip = grad_clip
        self.resize = resize
        self.bit_crop = bit_crop
        self.translate = translate
        self.flip = flip
        self.test_crop = test_crop
        self.generative_weight = generative_weight
        self.feature_layer = feature_layer
        self.seed = seed
        self.precision = precision
        self.deterministic = deterministic
        self.eval_batch_size = eval_batch_size
        self.checkpoint_dir = checkpoint_dir
        self.checkpoint_every = checkpoint_every

    def family_settings(self, family: str = "convnet") -> dict[str, Any]:
        """The family keys for a backbone of ``family``: :data:`FAMILY_DEFAULTS`, then every key this
        protocol was given (a grad_clip given as ``None`` is the family's: give a large one to turn it off)."""
        defaults = FAMILY_DEFAULTS[family]
        return {k: defaults[k] if getattr(self, k) is None else getattr(self, k) for k in defaults}

    def joint_weight(self, backbone: Backbone) -> float:
        """``generative_weight`` as given, else 1 for a causal pixel-token backbone, 0 for the rest."""
        return float(has_pixel_tokens(backbone)) if self.generative_weight is None else self.generative_weight

    def blocks_run(self, backbone: Backbone) -> int | None:
        """``feature_layer`` as given, else igpt's depth; ``None`` for a backbone that has no such layer."""
        if not hasattr(backbone, "feature_layer"):
            if self.feature_layer is not None:
                raise ValueError(f"finetune: feature_layer={self.feature_layer} needs a backbone whose features "
                                 f"stop at a block (igpt); {type(backbone).__name__} has none: leave it unset")
            return None
        if (self.feature_layer or 0) > len(backbone.blocks):
            raise ValueError(f"finetune: feature_layer={self.feature_layer} exceeds the depth ({len(backbone.blocks)})")
        return self.feature_layer or len(backbone.blocks)

    def schedule(self, num_train_examples: int, image_size: int, source_size: int,
                 family: str = "convnet") -> Schedule:
        """:func:`hyperrule` for the task, with this protocol's overrides and ``family``'s defaults applied."""
        opt = self.family_settings(family)
        base_lr, weight_decay = opt["base_lr"], opt["weight_decay"]
        s = hyperrule(num_train_examples, self.batch_size, image_size, source_size, base_lr=base_lr,
                      steps=self.steps, schedule_scale=self.schedule_scale, decay_at=self.decay_at)
        given = {"lr": self.lr, "warmup_steps": self.warmup_steps, "mixup_alpha": self.mixup_alpha,
                 "resize": self.resize if self.resize is not None or opt["bit_crop"] else image_size}
        s = dataclasses.replace(s, momentum=self.momentum, weight_decay=weight_decay, decay=opt["decay"],
                                translate=self.translate,
                                **{k: v for k, v in given.items() if v is not None})
        if s.resize < s.crop:
            raise ValueError(f"finetune: resize={s.resize} is smaller than the crop ({s.crop})")
        return s

    def fit(self, backbone: Backbone, train: TensorImages, seed: int | None = None,
            console: Console | None = None) -> tuple[Classifier, Schedule]:
        """Fine-tune a copy of ``backbone`` on ``train`` through the training loop (resuming from
        ``checkpoint_dir`` when it holds this fine-tune); returns the model (eval mode) and its schedule."""
        seed = self.seed if seed is None else seed
        dev = next(backbone.parameters()).device
        backbone = copy.deepcopy(backbone)  # the caller's is never touched
        if (layer := self.blocks_run(backbone)) is not None:
            backbone.feature_layer = layer
            if isinstance(getattr(backbone, "architecture", None), dict):  # what a saved fine-tune rebuilds
                backbone.architecture = {**backbone.architecture, "feature_layer": layer}
        s = self.schedule(len(train), backbone.image_size, train.image_size, backbone.family)
        fam = self.family_settings(backbone.family)
        identity = self.identity(backbone, train, seed, s)
        run_dir = self._run_dir(identity)
        log_every, dtype = max(1, s.steps // 20), autocast_dtype(self.precision, dev)
        loop = Loop(steps=s.steps, seed=seed, grad_clip=fam["grad_clip"], dtype=dtype,
                    deterministic=self.deterministic, run_dir=run_dir,
                    checkpoint_every=self.checkpoint_every or max(1, s.steps // 10),
                    log_every=log_every, stop_on_signal=False, label="finetune", lr_key="finetune lr",
                    meta={"finetune": identity, **rebuild_meta(backbone, train)})
        if run_dir is not None:
            check_resumable(run_dir, identity)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)  # stochastic depth and the like draw from the global RNG
            model = Classifier(backbone, train.num_classes, s, self.flip, self.test_crop,
                               self.joint_weight(backbone)).to(dev).train()
            model.backbone.set_drop_path(fam["drop_path"])
            opt = optimiser(model, s, fam)
            out = fit(model, opt, s.lr_at, lambda start: batches(train, s.batch_size, seed, start, s.steps), loop,
                      console or Console())
        records = read_metrics(run_dir / "metrics.jsonl") if run_dir is not None else out["history"]
        tail = [r["loss"] for r in records if r["step"] > s.steps - max(log_every, s.steps // 10)]
        model.train_loss = float(np.mean(tail)) if tail else None
        return model.eval(), s

    def identity(self, backbone: Backbone, train: TensorImages, seed: int, s: Schedule) -> dict[str, Any]:
        """Everything that defines this fine-tune, as recorded in its checkpoints' meta and hashed into
        its folder: the schedule, every training setting of the protocol (all but ``checkpoint_dir``,
        ``checkpoint_every``, ``eval_batch_size`` and ``deterministic``, which change neither the weights
        nor the score beyond a GPU's last bits), the task (its class count and names, and a hash of its
        images and labels) and the starting weights (a hash of the backbone's state dict: the source checkpoint)."""
        skip = ("checkpoint_dir", "checkpoint_every", "eval_batch_size", "deterministic", "feature_layer")
        settings = {k: v for k, v in vars(self).items() if k not in skip}
        settings.update(self.family_settings(backbone.family), family=backbone.family,
                        generative_weight=self.joint_weight(backbone))
        if (layer := self.blocks_run(backbone)) is not None:  # igpt alone: other identities stay as they were
            settings["feature_layer"] = layer
        state = sorted(backbone.state_dict().items())
        identity = {"schedule": s.as_dict(), **settings, "seed": seed,
                    "task": {"num_classes": train.num_classes, "classes": [str(c) for c in train.classes or []],
                             "examples": len(train), "sha256": _digest(train.images, train.targets)},
                    "backbone_sha256": _digest(*(t for _, t in state), names=[k for k, _ in state])}
        return json.loads(json.dumps(identity))  # as meta.json gives it back (tuples are lists)

    def _run_dir(self, identity: dict[str, Any]) -> Path | None:
        """``checkpoint_dir/<digest of identity>``: fine-tunes of other tasks, settings or starting
        weights (pretrained, random init) never share a folder, so never resume each other."""
        if self.checkpoint_dir is None:
            return None
        h = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
        return Path(self.checkpoint_dir).expanduser() / h.hexdigest()[:16]

    @torch.inference_mode()
    def predict_proba(self, model: Classifier, test: TensorImages) -> torch.Tensor:
        """Class probabilities ``(N, num_classes)`` (float32, CPU) on whole test images."""
        dev = next(model.parameters()).device
        dtype = autocast_dtype(self.precision, dev)
        out = []
        for i in range(0, len(test), self.eval_batch_size):
            x = model.test_input(test.images[i:i + self.eval_batch_size]).to(dev)
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out.append(model.logits(x).float().softmax(-1).cpu())
        return torch.cat(out)

    def run(self, backbone: Backbone, train: TensorImages, test: TensorImages) -> dict[str, Any]:
        model, s = self.fit(backbone, train)
        pred = self.predict_proba(model, test).argmax(1)
        optimizer = {"family": backbone.family, "batch_size": self.batch_size, **self.family_settings(backbone.family),
                     "generative_weight": model.generative_weight}
        if (layer := getattr(model.backbone, "feature_layer", None)) is not None:  # the blocks that ran (igpt)
            optimizer["feature_layer"] = layer
        return {"top1": 100.0 * (pred == test.targets).float().mean().item(), "train_loss": model.train_loss,
                "schedule": s.as_dict(), "optimizer": optimizer}


def optimiser(model: Classifier, s: Schedule, settings: dict[str, Any]) -> torch.optim.Optimizer:
    """SGD (BiT) or AdamW (betas 0.9, 0.999). Without layer-wise decay SGD treats every weight alike,
    as BiT does; otherwise (and always for AdamW) the parameters are grouped: the backbone's layers with
    their ``lr_scale`` (which :func:`bigmodel.train.trainer.fit` applies), weight decay on matrices
    only, the heads (class, and next-pixel with ``generative_weight``) at the full learning rate."""
    bb, decay, sgd = model.backbone, settings["layer_decay"], settings["optimizer"] == "sgd"
    if decay < 1 and bb.group_matcher() is None:
        raise ValueError(f"finetune: layer_decay={decay} needs a backbone whose layers are grouped "
                         f"({type(bb).__name__} has none); set layer_decay: 1")
    if sgd and decay == 1:
        return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    skip = bb.no_weight_decay()
    groups = (param_groups_layer_decay(bb, s.weight_decay, skip, layer_decay=decay) if decay < 1
              else param_groups_weight_decay(bb, s.weight_decay, skip))
    for g in groups:  # timm scales the top layer by 1; the head is one layer above it (MAE's layer ids)
        g["lr_scale"] = g.get("lr_scale", 1.0) * decay
    heads = [model.head] + ([model.gen_head] if model.gen_head is not None else [])
    groups += [{**g, "lr_scale": 1.0} for g in param_groups_weight_decay(nn.ModuleList(heads), s.weight_decay)]
    if sgd:
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum)
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.999))


def rebuild_meta(backbone: Backbone, train: TensorImages) -> dict[str, Any]:
    """What a fine-tune checkpoint records so that it rebuilds without the task's data
    (:func:`bigmodel.loader.load`, ``bigmodel predict``): the task's class count and names
    (``classes``: empty where the data names none), and the recipe section of the backbone's
    architecture when the backbone carries it as ``backbone.architecture`` (``{name, **kwargs}``)."""
    meta: dict[str, Any] = {"num_classes": train.num_classes, "classes": [str(c) for c in train.classes or []]}
    section = getattr(backbone, "architecture", None)
    if isinstance(section, dict) and section.get("name"):
        meta["architecture"] = dict(section)
    return meta


def check_resumable(run_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of ``run_dir`` whose recorded fine-tune is not this one.

    The folder name is a digest of ``identity``, so a mismatch means a folder from another version
    or one edited by hand: resuming it would score another fine-tune's classifier, and starting
    over there would overwrite it, so neither happens; the user removes it or picks another folder."""
    last = checkpoint.latest(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else None
    if last is None:
        return
    recorded = checkpoint.load_meta(last).get("finetune")
    if recorded != identity:
        keys = sorted(k for k in {*(recorded or {}), *identity} if (recorded or {}).get(k) != identity.get(k))
        raise CheckpointError(f"{last}: this checkpoint holds another fine-tune (differs in: {', '.join(keys)}); "
                              f"it is not resumed: remove {run_dir} or set another checkpoint_dir")


def _digest(*tensors: torch.Tensor, names: list[str] | None = None) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``tensors``."""
    h = hashlib.sha256()
    for i, t in enumerate(tensors):
        h.update(f"{names[i] if names else i}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
