"""finetune: BiT-HyperRule picks the published schedule; the protocol learns, is deterministic and
never touches the caller's backbone."""

from __future__ import annotations

import pytest
import torch

from bigmodel.data.digits import digits
from bigmodel.registry import PROTOCOLS
from bigmodel.transfer.finetune import Finetune, hyperrule, random_crop


@pytest.mark.parametrize(("n", "regime", "steps", "warmup", "mixup"), [
    (5_000, "small", 500, 100, 0.0),
    (100_000, "medium", 10_000, 500, 0.1),
    (1_000_000, "large", 20_000, 500, 0.1),
])
def test_hyperrule_published_schedule(n, regime, steps, warmup, mixup):
    s = hyperrule(n)  # BiT's batch of 512
    assert (s.regime, s.steps, s.warmup_steps, s.mixup_alpha) == (regime, steps, warmup, mixup)
    assert s.decay_steps == (round(0.3 * steps), round(0.6 * steps), round(0.9 * steps))
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


def test_hyperrule_shortened_schedules_keep_their_shape():
    s = hyperrule(5_000, steps=50)
    assert (s.steps, s.warmup_steps, s.decay_steps) == (50, 10, (15, 30, 45))
    assert hyperrule(5_000, schedule_scale=0.1) == s
    m = hyperrule(100_000, schedule_scale=0.01)
    assert (m.steps, m.warmup_steps, m.decay_steps) == (100, 5, (30, 60, 90))


def test_lr_schedule_warms_up_then_steps_down():
    s = hyperrule(5_000, batch_size=512)
    assert s.lr_at(0) == pytest.approx(0.003 / 100)
    assert s.lr_at(99) == pytest.approx(0.003)
    assert [s.lr_at(t) for t in (149, 150, 300, 450, 499)] == pytest.approx([3e-3, 3e-4, 3e-5, 3e-6, 3e-6])


def test_every_value_can_be_overridden():
    kwargs = PROTOCOLS.validate("finetune", {"lr": 0.1, "warmup_steps": 3, "mixup_alpha": 0.2, "batch_size": 64,
                                             "steps": 20, "resize": 36, "momentum": 0.5, "weight_decay": 1e-4})
    s = PROTOCOLS.build("finetune", **kwargs).schedule(50_000, image_size=32, source_size=32)
    assert (s.lr, s.warmup_steps, s.mixup_alpha, s.batch_size, s.steps, s.resize, s.momentum, s.weight_decay) == \
        (0.1, 3, 0.2, 64, 20, 36, 0.5, 1e-4)
    with pytest.raises(ValueError, match="lrr"):
        PROTOCOLS.validate("finetune", {"lrr": 0.1})


def test_random_crop_takes_windows():
    x = torch.arange(2 * 3 * 10 * 10, dtype=torch.float32).view(2, 3, 10, 10)
    out = random_crop(x, 8, torch.Generator().manual_seed(0))
    assert out.shape == (2, 3, 8, 8)
    for i in range(2):
        dy, dx = divmod(int(out[i, 0, 0, 0].item()) - i * 300, 10)
        assert torch.equal(out[i], x[i, :, dy:dy + 8, dx:dx + 8])


def test_finetune_learns_quickly_is_deterministic_and_leaves_the_backbone(tiny_mlp):
    train, test = digits(split="train"), digits(split="test")
    net = tiny_mlp()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    protocol = Finetune(steps=50, batch_size=64, lr=0.3, flip=False)
    result = protocol.run(net, train, test)
    assert result["top1"] > 40.0  # chance: 10 %
    assert result["schedule"]["steps"] == 50 and result["schedule"]["regime"] == "small"
    assert 0 < result["train_loss"] < 2.3
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert protocol.run(net, train, test)["top1"] == result["top1"]


def test_finetune_with_mixup_returns_probabilities(tiny_mlp):
    train, test = digits(split="train"), digits(split="test")
    protocol = Finetune(steps=5, batch_size=16, mixup_alpha=0.1, lr=0.05)
    model, schedule = protocol.fit(tiny_mlp(), train)
    probs = protocol.predict_proba(model, test)
    assert schedule.mixup_alpha == 0.1
    assert probs.shape == (len(test), 10)
    assert torch.allclose(probs.sum(1), torch.ones(len(test)), atol=1e-5)
