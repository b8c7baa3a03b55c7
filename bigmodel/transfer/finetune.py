"""Full fine-tuning with BiT-HyperRule (Kolesnikov et al., 2020, "Big Transfer (BiT): General Visual
Representation Learning", arXiv:1912.11370, §3.3).

A copy of the backbone gets a new zero-initialised linear head for the task and every weight is
trained; the caller's backbone is never touched. The schedule comes from :func:`hyperrule`, a pure
function of the task's size, so it is testable and recorded with the result:

- SGD, momentum 0.9, no weight decay, batch 512, learning rate 0.003 · batch / 512;
- 500 / 10k / 20k steps for tasks with < 20k / < 500k / more training images, with a linear
  warm-up over the first 100 / 500 / 500 steps (the values of the BiT code release), then the
  learning rate divided by 10 at 30 %, 60 % and 90 % of training;
- MixUp (Zhang et al., 2018) with α = 0.1 from 20k training images on, none below;
- resolution: BiT resizes images smaller than 96² pixels to 160² and takes random 128² crops
  (larger ones: 512² → 480²), and tests at the crop size. A ViT's input size is fixed by its
  position embeddings, so here the rule keeps the *ratio*: train on random ``image_size`` crops
  of the image resized to ``round(image_size · 160/128)`` (``· 512/480`` for sources ≥ 96²),
  with random horizontal flips, and test on the whole image resized to ``image_size``.

Every value can be overridden by a protocol key; ``steps`` or ``schedule_scale`` shorten the
whole schedule proportionally (warm-up and decay points included) for tests and CPU runs. In
schedules much shorter than BiT's the crop augmentation slows fitting (measured on 2k MNIST images,
100 steps of 64, ViT micro patch 8: 27.7 % with the rule's crops, 51.1 % with ``resize`` = the
backbone's image size, i.e. no crop); ``resize`` and ``flip`` turn it off.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Annotated, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from bigmodel.architectures.base import Backbone
from bigmodel.data.base import TensorImages
from bigmodel.data.loader import batches
from bigmodel.data.transforms import random_crop_flip, to_input
from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.base import Protocol

# (upper bound on training-set size, steps, warm-up steps) — BiT's small / medium / large tasks.
REGIMES = ((20_000, "small", 500, 100), (500_000, "medium", 10_000, 500), (math.inf, "large", 20_000, 500))
BASE_LR, BASE_BATCH = 0.003, 512
DECAY_AT = (0.3, 0.6, 0.9)
MIXUP_FROM, MIXUP_ALPHA = 20_000, 0.1
SMALL_AREA = 96 * 96
RESIZE_SMALL, RESIZE_LARGE = 160 / 128, 512 / 480


@dataclasses.dataclass(frozen=True)
class Schedule:
    """A fine-tuning schedule: what :func:`hyperrule` chose (plus any overrides)."""

    regime: str
    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    decay_steps: tuple[int, ...]
    decay_factor: float
    mixup_alpha: float
    momentum: float
    weight_decay: float
    resize: int  # training images are resized to resize², then randomly cropped to crop²
    crop: int
    test_size: int

    def lr_at(self, step: int) -> float:
        """Linear warm-up to ``lr``, then ×``decay_factor`` at each of ``decay_steps``."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        return self.lr * self.decay_factor ** sum(step >= s for s in self.decay_steps)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def hyperrule(num_train_examples: int, batch_size: int = BASE_BATCH, image_size: int = 128,
              source_size: int | None = None, *, base_lr: float = BASE_LR, steps: int | None = None,
              schedule_scale: float = 1.0, decay_at: tuple[float, ...] = DECAY_AT) -> Schedule:
    """BiT-HyperRule for a task of ``num_train_examples`` images.

    Args:
        batch_size: the learning rate is ``base_lr · batch_size / 512``.
        image_size: the backbone's input side (the crop and test size).
        source_size: the task's image side, which picks the resize ratio (default: small).
        steps: schedule length instead of the published one; warm-up scales with it.
        schedule_scale: multiplies the (published or given) length and warm-up.
        decay_at: fractions of training at which the learning rate drops ×0.1.
    """
    if num_train_examples < 1:
        raise ValueError("hyperrule: the training set is empty")
    regime, published, warmup = next((name, s, w) for bound, name, s, w in REGIMES if num_train_examples < bound)
    total = published if steps is None else steps
    total = max(1, round(total * schedule_scale))
    warmup = min(total - 1, round(warmup * total / published))
    small = source_size is None or source_size * source_size < SMALL_AREA
    return Schedule(
        regime=regime, steps=total, batch_size=batch_size, lr=base_lr * batch_size / BASE_BATCH,
        warmup_steps=max(0, warmup), decay_steps=tuple(round(f * total) for f in decay_at), decay_factor=0.1,
        mixup_alpha=MIXUP_ALPHA if num_train_examples >= MIXUP_FROM else 0.0, momentum=0.9, weight_decay=0.0,
        resize=round(image_size * (RESIZE_SMALL if small else RESIZE_LARGE)), crop=image_size, test_size=image_size,
    )


class Classifier(nn.Module):
    """A fine-tuned backbone with its task head: normalised images → logits ``(B, num_classes)``.
    After :meth:`Finetune.fit`, ``train_loss`` is the mean training loss of the last tenth of steps."""

    train_loss: float | None = None

    def __init__(self, backbone: Backbone, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # BiT: the new head starts at zero
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def random_crop(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random ``size²`` crops of a float batch ``(B, C, H, W)``."""
    b, c, h, w = x.shape
    dy = torch.randint(0, h - size + 1, (b,), generator=generator)
    dx = torch.randint(0, w - size + 1, (b,), generator=generator)
    ar = torch.arange(size)
    x = x.gather(2, (dy[:, None] + ar)[:, None, :, None].expand(b, c, size, w))
    return x.gather(3, (dx[:, None] + ar)[:, None, None, :].expand(b, c, size, size))


@PROTOCOLS.register("finetune")
class Finetune(Protocol):
    """Args (``None`` = BiT-HyperRule's value for the task):
    steps: schedule length (published: 500 / 10k / 20k by task size).
    schedule_scale: multiplies the schedule length and warm-up (e.g. 0.1 for a CPU run).
    batch_size: images per step (published: 512).
    lr: peak learning rate (published: 0.003 · batch_size / 512).
    warmup_steps: linear warm-up steps.
    decay_at: fractions of training at which the learning rate drops ×0.1.
    mixup_alpha: MixUp's α, 0 = off (published: 0.1 from 20k training images).
    momentum: SGD momentum.
    weight_decay: SGD weight decay (BiT: none).
    grad_clip: clip the global gradient norm (BiT: none).
    resize: training resize side before the random crop (published: image_size · 160/128).
    flip: random horizontal flips in training.
    seed: data order, augmentation, MixUp and stochastic depth.
    precision: fp32, bf16 autocast, or auto (bf16 where the hardware runs it fast).
    eval_batch_size: images per forward pass at test time.
    """

    frozen = False

    def __init__(
        self,
        steps: Annotated[int, Field(ge=1)] | None = None,
        schedule_scale: Annotated[float, Field(gt=0)] = 1.0,
        batch_size: Annotated[int, Field(ge=1)] = BASE_BATCH,
        lr: Annotated[float, Field(gt=0)] | None = None,
        warmup_steps: Annotated[int, Field(ge=0)] | None = None,
        decay_at: tuple[float, ...] = DECAY_AT,
        mixup_alpha: Annotated[float, Field(ge=0)] | None = None,
        momentum: Annotated[float, Field(ge=0, lt=1)] = 0.9,
        weight_decay: Annotated[float, Field(ge=0)] = 0.0,
        grad_clip: Annotated[float, Field(gt=0)] | None = None,
        resize: Annotated[int, Field(ge=1)] | None = None,
        flip: bool = True,
        seed: int = 0,
        precision: Literal["fp32", "bf16", "auto"] = "fp32",
        eval_batch_size: Annotated[int, Field(ge=1)] = 256,
    ):
        self.steps = steps
        self.schedule_scale = schedule_scale
        self.batch_size = batch_size
        self.lr = lr
        self.warmup_steps = warmup_steps
        self.decay_at = tuple(decay_at)
        self.mixup_alpha = mixup_alpha
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.resize = resize
        self.flip = flip
        self.seed = seed
        self.precision = precision
        self.eval_batch_size = eval_batch_size

    def schedule(self, num_train_examples: int, image_size: int, source_size: int) -> Schedule:
        """:func:`hyperrule` for the task, with this protocol's overrides applied."""
        s = hyperrule(num_train_examples, self.batch_size, image_size, source_size, steps=self.steps,
                      schedule_scale=self.schedule_scale, decay_at=self.decay_at)
        given = {"lr": self.lr, "warmup_steps": self.warmup_steps, "mixup_alpha": self.mixup_alpha,
                 "resize": self.resize}
        s = dataclasses.replace(s, momentum=self.momentum, weight_decay=self.weight_decay,
                                **{k: v for k, v in given.items() if v is not None})
        if s.resize < s.crop:
            raise ValueError(f"finetune: resize={s.resize} is smaller than the crop ({s.crop})")
        return s

    def fit(self, backbone: Backbone, train: TensorImages, seed: int | None = None) -> tuple[Classifier, Schedule]:
        """Fine-tune a copy of ``backbone`` on ``train``; returns the model (eval mode) and its schedule."""
        seed = self.seed if seed is None else seed
        dev = next(backbone.parameters()).device
        s = self.schedule(len(train), backbone.image_size, train.image_size)
        dtype = _autocast_dtype(self.precision, dev)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)  # stochastic depth and the like draw from the global RNG
            model = Classifier(copy.deepcopy(backbone), train.num_classes).to(dev).train()
            opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
            rng = np.random.default_rng(seed)
            tail = []  # losses of the last tenth of training, summed up without a host sync per step
            for step, (images, labels) in enumerate(batches(train, s.batch_size, seed, 0, s.steps)):
                for group in opt.param_groups:
                    group["lr"] = s.lr_at(step)
                gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
                x = to_input(images, s.resize, backbone.in_chans)
                x = random_crop_flip(random_crop(x, s.crop, gen), gen, pad=0, flip=self.flip).to(dev)
                labels = labels.to(dev)
                lam = float(rng.beta(s.mixup_alpha, s.mixup_alpha)) if s.mixup_alpha > 0 else 1.0
                perm = torch.randperm(len(x), generator=gen).to(dev) if lam < 1 else None
                if perm is not None:  # MixUp as in BiT: one λ per batch
                    x = lam * x + (1 - lam) * x[perm]
                with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = model(x).float()
                loss = F.cross_entropy(logits, labels)
                if perm is not None:
                    loss = lam * loss + (1 - lam) * F.cross_entropy(logits, labels[perm])
                if (step % 100 == 0 or step == s.steps - 1) and not math.isfinite(loss.item()):  # rare host sync
                    raise FloatingPointError(f"finetune: loss became {loss.item()} at step {step} (try a lower lr)")
                if step >= s.steps - max(1, s.steps // 10):
                    tail.append(loss.detach())
                loss.backward()
                if self.grad_clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        model.train_loss = torch.stack(tail).mean().item()
        return model.eval(), s

    @torch.inference_mode()
    def predict_proba(self, model: Classifier, test: TensorImages) -> torch.Tensor:
        """Class probabilities ``(N, num_classes)`` (float32, CPU) on whole test images."""
        dev = next(model.parameters()).device
        dtype = _autocast_dtype(self.precision, dev)
        size, in_chans = model.backbone.image_size, model.backbone.in_chans
        out = []
        for i in range(0, len(test), self.eval_batch_size):
            x = to_input(test.images[i:i + self.eval_batch_size], size, in_chans).to(dev)
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out.append(model(x).float().softmax(-1).cpu())
        return torch.cat(out)

    def run(self, backbone: Backbone, train: TensorImages, test: TensorImages) -> dict[str, Any]:
        model, s = self.fit(backbone, train)
        pred = self.predict_proba(model, test).argmax(1)
        return {"top1": 100.0 * (pred == test.targets).float().mean().item(), "train_loss": model.train_loss,
                "schedule": s.as_dict()}


def _autocast_dtype(precision: str, dev: torch.device) -> torch.dtype | None:
    from bigmodel.recipe import RunConfig
    from bigmodel.train.build import autocast_dtype

    return autocast_dtype(RunConfig(precision=precision), dev)
