"""BiT-HyperRule (Kolesnikov et al., 2020, "Big Transfer (BiT): General Visual Representation Learning",
arXiv:1912.11370, §3.3 and the ``bit_hyperrule.py`` of its code release): a fine-tuning schedule as a
pure function of the task's size, so it is testable and recorded with the result.

- SGD, momentum 0.9, no weight decay, batch 512, learning rate 0.003 · batch / 512;
- tasks with < 20k training images: 500 steps, linear warm-up over 100, learning rate ÷10 at
  steps 200, 300 and 400; < 500k: 10k steps, warm-up 500, ÷10 at 3k, 6k, 9k; more: 20k steps,
  warm-up 500, ÷10 at 6k, 12k, 18k;
- MixUp (Zhang et al., 2018) with α = 0.1 from 20k training images on, none below;
- resolution: BiT resizes images smaller than 96² pixels to 160² and takes random 128² crops
  (larger ones: 512² → 480²), and tests at the crop size. A ViT's input size is fixed by its
  position embeddings, so here the rule keeps the *ratio*: train on random ``image_size`` crops
  of the image resized to ``round(image_size · 160/128)`` (``· 512/480`` for sources ≥ 96²).

``steps`` or ``schedule_scale`` shorten the whole schedule proportionally (warm-up and decay steps
included) for tests and CPU runs. :class:`bigmodel.transfer.finetune.Finetune` applies the rule with
its own defaults and overrides.
"""

from __future__ import annotations

import math

from bigmodel.objectives.classifier import Schedule

# (upper bound on training-set size, name, steps, warm-up steps, lr ÷10 steps): BiT-HyperRule's
# small / medium / large tasks, as published.
REGIMES = ((20_000, "small", 500, 100, (200, 300, 400)),
           (500_000, "medium", 10_000, 500, (3_000, 6_000, 9_000)),
           (math.inf, "large", 20_000, 500, (6_000, 12_000, 18_000)))
BASE_LR, BASE_BATCH = 0.003, 512  # BiT's learning rate at its batch size
MIXUP_FROM, MIXUP_ALPHA = 20_000, 0.1
SMALL_AREA = 96 * 96
RESIZE_SMALL, RESIZE_LARGE = 160 / 128, 512 / 480


def hyperrule(num_train_examples: int, batch_size: int = BASE_BATCH, image_size: int = 128,
              source_size: int | None = None, *, base_lr: float = BASE_LR, steps: int | None = None,
              schedule_scale: float = 1.0, decay_at: tuple[float, ...] | None = None) -> Schedule:
    """BiT-HyperRule for a task of ``num_train_examples`` images.

    Args:
        batch_size: the learning rate is ``base_lr · batch_size / 512``, and the published length
            (steps at batch 512) becomes ``published · 512 / batch_size``: the same images at any
            batch, as the linear scaling rule has it (Goyal et al., 2017).
        image_size: the backbone's input side (the crop and test size).
        source_size: the task's image side, which picks the resize ratio (default: small).
        steps: schedule length (at ``batch_size``) instead of the published one (warm-up, decay scale).
        schedule_scale: multiplies the (published or given) length, warm-up and decay steps.
        decay_at: fractions of training at which the learning rate drops ×0.1 (default: published).
    """
    if num_train_examples < 1:
        raise ValueError("hyperrule: the training set is empty")
    regime, published, warmup, decays = next(r[1:] for r in REGIMES if num_train_examples < r[0])
    length = published * BASE_BATCH / batch_size if steps is None else steps
    total = max(1, round(length * schedule_scale))
    fractions = tuple(d / published for d in decays) if decay_at is None else tuple(decay_at)
    small = source_size is None or source_size * source_size < SMALL_AREA
    return Schedule(
        regime=regime, steps=total, batch_size=batch_size, lr=base_lr * batch_size / BASE_BATCH,
        warmup_steps=max(0, min(total - 1, round(warmup * total / published))),
        decay_steps=tuple(round(f * total) for f in fractions), decay_factor=0.1,
        mixup_alpha=MIXUP_ALPHA if num_train_examples >= MIXUP_FROM else 0.0, momentum=0.9, weight_decay=0.0,
        resize=round(image_size * (RESIZE_SMALL if small else RESIZE_LARGE)), crop=image_size, test_size=image_size,
    )
