"""BiT-HyperRule: the published schedule, its boundaries and resolution, and the same images at any
length or batch."""

from __future__ import annotations

import pytest

from bigmodel.transfer.hyperrule import hyperrule


@pytest.mark.parametrize(("n", "regime", "steps", "warmup", "decays", "mixup"), [
    (5_000, "small", 500, 100, (200, 300, 400), 0.0),
    (100_000, "medium", 10_000, 500, (3_000, 6_000, 9_000), 0.1),
    (1_000_000, "large", 20_000, 500, (6_000, 12_000, 18_000), 0.1),
])
def test_hyperrule_published_schedule(n, regime, steps, warmup, decays, mixup):
    """BiT-HyperRule as published (arXiv:1912.11370 §3.3; bit_hyperrule.py of the code release)."""
    s = hyperrule(n)  # BiT's batch of 512
    assert (s.regime, s.steps, s.warmup_steps, s.decay_steps, s.mixup_alpha) == (regime, steps, warmup, decays, mixup)
    assert s.decay_factor == 0.1 and s.momentum == 0.9 and s.weight_decay == 0.0
    assert s.lr == pytest.approx(0.003)
    assert hyperrule(n, batch_size=128).lr == pytest.approx(0.003 * 128 / 512)


def test_hyperrule_boundaries_and_resolution():
    assert hyperrule(19_999).regime == "small" and hyperrule(19_999).mixup_alpha == 0.0
    assert hyperrule(20_000).regime == "medium" and hyperrule(20_000).mixup_alpha == 0.1
    assert hyperrule(499_999).regime == "medium" and hyperrule(500_000).regime == "large"
    small = hyperrule(1000, image_size=32, source_size=28)  # < 96²: BiT's 160 → 128, same ratio
    assert (small.resize, small.crop, small.test_size) == (40, 32, 32)
    large = hyperrule(1000, image_size=384, source_size=500)  # ≥ 96²: BiT's 512 → 480
    assert (large.resize, large.crop) == (410, 384)


def test_hyperrule_shortened_schedules_scale_the_published_boundaries():
    s = hyperrule(5_000, steps=50)  # 500 → 50: warm-up 100 → 10, decays 200/300/400 → 20/30/40
    assert (s.steps, s.warmup_steps, s.decay_steps) == (50, 10, (20, 30, 40))
    assert hyperrule(5_000, schedule_scale=0.1) == s
    m = hyperrule(100_000, schedule_scale=0.01)
    assert (m.steps, m.warmup_steps, m.decay_steps) == (100, 5, (30, 60, 90))
    big = hyperrule(1_000_000, steps=1000)
    assert (big.steps, big.warmup_steps, big.decay_steps) == (1000, 25, (300, 600, 900))
    assert hyperrule(5_000, steps=100, decay_at=(0.5,)).decay_steps == (50,)


def test_hyperrule_at_another_batch_sees_the_published_images():
    """The published lengths are steps at batch 512; at batch 128 the schedule takes 4× the steps (the same
    images, the same warm-up and decay fractions) at a quarter of the lr (linear scaling, Goyal et al.)."""
    s = hyperrule(5_000, batch_size=128)
    assert (s.steps, s.warmup_steps, s.decay_steps, s.lr) == (2000, 400, (800, 1200, 1600), 0.003 / 4)
    assert hyperrule(5_000, batch_size=128, steps=50).steps == 50  # a given length is taken as is
    m = hyperrule(60_000, batch_size=128, schedule_scale=0.05)  # the README's MNIST target for transformers
    assert (m.steps, m.warmup_steps, m.steps * m.batch_size) == (2000, 100, 500 * 512)
