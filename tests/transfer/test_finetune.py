"""finetune (BiT-HyperRule itself: test_hyperrule.py): the protocol learns, is deterministic,
never touches the caller's backbone, and trains through the one training loop (train_step,
progress line, checkpoints, resume)."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch
from rich.console import Console

from bigmodel.architectures.lstm import LSTM
from bigmodel.architectures.resnet import ResNet
from bigmodel.data.digits import digits
from bigmodel.data.transforms import random_crop, to_input
from bigmodel.registry import PROTOCOLS
from bigmodel.train import checkpoint, trainer
from bigmodel.transfer.finetune import Classifier, Finetune, hyperrule


def test_lr_schedule_warms_up_then_steps_down():
    s = hyperrule(5_000, batch_size=512)
    assert s.lr_at(0) == pytest.approx(0.003 / 100)
    assert s.lr_at(99) == pytest.approx(0.003)
    assert [s.lr_at(t) for t in (199, 200, 299, 300, 400, 499)] == pytest.approx([3e-3, 3e-4, 3e-4, 3e-5, 3e-6, 3e-6])


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


def _counting(monkeypatch, fail_at: int | None = None) -> list[int]:
    """Wrap trainer.train_step: count calls; raise (a stand-in for a kill) on call ``fail_at``."""
    calls, real = [], trainer.train_step

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step)
    return calls


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_finetune_runs_through_the_training_loop_with_its_progress_line(tiny_mlp, monkeypatch):
    calls = _counting(monkeypatch)
    out = io.StringIO()
    Finetune(steps=6, batch_size=16, lr=0.1).fit(tiny_mlp(), digits(split="train"), console=Console(file=out))
    assert len(calls) == 6  # one trainer.train_step per fine-tuning step
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("step ")]
    assert [ln.split()[1] for ln in lines] == [f"{i}/6" for i in range(1, 7)]  # StepProgress, log every step


def test_finetune_checkpoints_and_a_killed_finetune_resumes_to_the_same_weights(tiny_mlp, monkeypatch, tmp_path):
    train = digits(split="train")
    protocol = Finetune(steps=8, batch_size=16, lr=0.1, mixup_alpha=0.2, checkpoint_every=2,
                        checkpoint_dir=str(tmp_path / "ft"))
    whole, _ = Finetune(steps=8, batch_size=16, lr=0.1, mixup_alpha=0.2).fit(tiny_mlp(), train,
                                                                            console=Console(quiet=True))

    calls = _counting(monkeypatch, fail_at=5)  # dies in step 5, after the checkpoint of step 4
    with pytest.raises(RuntimeError, match="killed"):
        protocol.fit(tiny_mlp(), train, console=Console(quiet=True))
    (run,) = (tmp_path / "ft").iterdir()
    assert checkpoint.latest(run).name == "step_00000004"

    calls.clear()
    out = io.StringIO()
    resumed, _ = protocol.fit(tiny_mlp(), train, console=Console(file=out, width=400))
    assert len(calls) == 4 and f"resuming from {run / 'checkpoints' / 'step_00000004'}" in out.getvalue()
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.latest(run).name == "step_00000008"
    steps = [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    meta = checkpoint.load_meta(checkpoint.latest(run))["finetune"]
    assert (meta["seed"], meta["schedule"]["steps"], meta["schedule"]["mixup_alpha"]) == (0, 8, 0.2)


def test_finetunes_of_different_backbones_never_resume_each_other(tiny_mlp, tmp_path):
    protocol = Finetune(steps=2, batch_size=16, lr=0.1, checkpoint_dir=str(tmp_path))
    protocol.fit(tiny_mlp(seed=0), digits(split="train"), console=Console(quiet=True))
    out = io.StringIO()
    protocol.fit(tiny_mlp(seed=1), digits(split="train"), console=Console(file=out))
    assert "resuming" not in out.getvalue() and len(list(tmp_path.iterdir())) == 2


def test_finetune_stops_on_a_non_finite_loss(tiny_mlp):
    with pytest.raises(trainer.NonFiniteLoss,
                       match=r"^gradient norm became inf at step 2; nothing was saved \(try a lower finetune lr\)$"):
        Finetune(steps=3, batch_size=16, lr=1e30, warmup_steps=0).fit(tiny_mlp(), digits(split="train"),
                                                                       console=Console(quiet=True))


def test_default_learning_rate_is_the_measured_one_not_bits():
    """BiT's 0.003 · batch / 512 left 200-step MNIST fine-tunes at chance (module docstring); the
    protocol's default is 0.4 · batch / 512, and hyperrule itself still returns the published value."""
    assert Finetune(batch_size=512).schedule(5_000, 28, 28).lr == 0.4
    assert Finetune().schedule(5_000, 28, 28).lr == Finetune(batch_size=128).schedule(5_000, 28, 28).lr == 0.1
    assert Finetune(batch_size=128, base_lr=0.003).schedule(5_000, 28, 28).lr == 0.003 * 128 / 512
    assert Finetune(batch_size=128, lr=0.02).schedule(5_000, 28, 28).lr == 0.02
    assert hyperrule(5_000, batch_size=128).lr == 0.003 * 128 / 512
    assert Finetune().flip is False  # a mirrored digit is another symbol


def test_default_learning_rate_learns_where_bits_stays_at_chance(tiny_mlp):
    train = digits(split="train")
    losses = {}
    for base_lr in (0.4, 0.003):
        model, _ = Finetune(steps=50, batch_size=64, base_lr=base_lr).fit(tiny_mlp(), train,
                                                                          console=Console(quiet=True))
        losses[base_lr] = model.train_loss
    assert losses[0.003] > 2.29  # ln 10 = 2.303: the zero-initialised head has barely moved
    assert losses[0.4] < 2.25


def test_test_images_have_the_training_scale():
    """Training crops ``crop²`` out of the image resized to ``resize²``; the test input is the centre
    ``crop²`` of the same resize (BiT's whole image at crop size with ``test_crop=false``)."""
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    s = hyperrule(5_000, 128, image_size=28, source_size=28)
    assert (s.resize, s.crop) == (35, 28)
    net = ResNet(depth=18, width=0.125, image_size=28, in_chans=1)
    centre = Classifier(net, 10, s).test_input(images)
    torch.testing.assert_close(centre, to_input(images, 35, 1)[..., 3:31, 3:31], rtol=0, atol=0)
    whole = Classifier(net, 10, s, test_crop=False).test_input(images)
    torch.testing.assert_close(whole, to_input(images, 28, 1), rtol=0, atol=0)
    assert Finetune().test_crop is True


def test_translate_shifts_each_training_image_without_rescaling_it():
    """``translate: t``: each training view is a window of the image reflect-padded by ``t``, at the
    backbone's size; its offset is the image's own, within ± t; ``translate: 0`` is no shift."""
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    s = Finetune(translate=2).schedule(5_000, 16, 16, "transformer")
    assert (s.resize, s.crop, s.translate) == (16, 16, 2)
    view, = Classifier(_vit(), 10, s).views(images, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(to_input(images, 16, 1), (2, 2, 2, 2), mode="reflect")
    windows = {(dy, dx): padded[:, :, dy:dy + 16, dx:dx + 16] for dy in range(5) for dx in range(5)}
    offsets = [next(o for o, w in windows.items() if torch.equal(w[i], view[i])) for i in range(len(images))]
    assert len(set(offsets)) > 1  # not one shift for the batch
    still, = Classifier(_vit(), 10, Finetune().schedule(5_000, 16, 16, "transformer")).views(
        images, torch.Generator().manual_seed(1))
    assert torch.equal(still, to_input(images, 16, 1))


def test_finetune_leaves_signals_to_its_caller(tiny_mlp, monkeypatch, tmp_path):
    """``bigmodel run`` handles SIGTERM around the transfer suite (finish the row, keep the rows done);
    a fine-tune with a checkpoint folder must not take the signal from it."""
    import signal

    seen, real = [], trainer.train_step
    monkeypatch.setattr(trainer, "train_step",
                        lambda *a, **k: seen.append(signal.getsignal(signal.SIGTERM)) or real(*a, **k))
    before = signal.getsignal(signal.SIGTERM)
    Finetune(steps=2, batch_size=16, checkpoint_dir=str(tmp_path)).fit(tiny_mlp(), digits(split="train"),
                                                                       console=Console(quiet=True))
    assert seen == [before, before]


def _task(path, labels_seed: int):
    """An npz task of 64 train / 32 test 8² images: the same images for every ``labels_seed``, other labels."""
    import numpy as np

    rng = np.random.default_rng(0)
    x_train, x_test = (rng.integers(0, 256, (n, 8, 8), dtype=np.uint8) for n in (64, 32))
    lab = np.random.default_rng(labels_seed)
    np.savez(path, x_train=x_train, y_train=lab.integers(0, 4, 64), x_test=x_test, y_test=lab.integers(0, 4, 32))
    return str(path)


def test_finetunes_of_two_tasks_of_one_size_never_resume_each_other(tiny_run, tmp_path, capsys):
    """Issue 17: ``transfer RUN --task a.npz --protocol finetune --set checkpoint_dir=ft``, then ``b.npz``
    (same size, other labels): the second trains from its own start and reports its own number, the
    one it gets in an empty folder. (The protocol prints its progress and resume lines to stdout.)"""
    from bigmodel import api

    a, b = _task(tmp_path / "a.npz", 1), _task(tmp_path / "b.npz", 2)
    settings = {"steps": 3, "batch_size": 16, "lr": 0.1, "checkpoint_dir": str(tmp_path / "ft"),
                "deterministic": True}  # the same bits twice on a GPU too
    api.transfer(tiny_run, a, "finetune", quiet=True, **settings)
    capsys.readouterr()
    row_b = api.transfer(tiny_run, b, "finetune", quiet=True, **settings)
    printed = capsys.readouterr().out
    alone = api.transfer(tiny_run, b, "finetune", quiet=True,
                         **{**settings, "checkpoint_dir": str(tmp_path / "b")})
    assert "resuming" not in printed and "step 3/3" in printed
    assert len(list((tmp_path / "ft").iterdir())) == 2
    own, ref = ({k: v for k, v in r["results"]["pretrained"].items() if k != "seconds"} for r in (row_b, alone))
    assert own == ref
    # and task a again resumes its own finished fine-tune: nothing is trained again
    capsys.readouterr()
    api.transfer(tiny_run, a, "finetune", quiet=True, **settings)
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "(step 3)" in printed and "step 1/3" not in printed


def test_the_folder_key_covers_task_data_classes_settings_precision_and_weights(tiny_mlp, tmp_path):
    base = Finetune(steps=2, batch_size=16, checkpoint_dir=str(tmp_path))
    train = digits(split="train")
    s = base.schedule(len(train), 8, train.image_size)

    def key(protocol=base, net=None, data=train):
        return protocol._run_dir(protocol.identity(net or tiny_mlp(), data, protocol.seed, s)).name

    relabelled = train.subset(torch.arange(len(train)))
    relabelled.targets = relabelled.targets.roll(1)
    more_classes = train.subset(torch.arange(len(train)))
    more_classes.num_classes = 11
    keys = [key(), key(data=relabelled), key(data=more_classes), key(net=tiny_mlp(seed=1)),
            key(Finetune(steps=2, batch_size=16, checkpoint_dir=str(tmp_path), precision="bf16")),
            key(Finetune(steps=2, batch_size=16, checkpoint_dir=str(tmp_path), grad_clip=1.0)),
            key(Finetune(steps=2, batch_size=16, checkpoint_dir=str(tmp_path), test_crop=False))]
    assert len(set(keys)) == len(keys)
    # what changes neither the weights nor the score keeps the folder (a killed fine-tune resumes)
    assert key(Finetune(steps=2, batch_size=16, checkpoint_dir=str(tmp_path / "x"), checkpoint_every=1,
                        eval_batch_size=7)) == keys[0]


def test_a_checkpoint_recording_another_finetune_is_refused_not_resumed(tiny_mlp, tmp_path):
    from bigmodel.errors import CheckpointError

    protocol = Finetune(steps=2, batch_size=16, lr=0.1, checkpoint_dir=str(tmp_path))
    train = digits(split="train")
    protocol.fit(tiny_mlp(), train, console=Console(quiet=True))
    (run,) = tmp_path.iterdir()
    meta_path = checkpoint.latest(run) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["finetune"]["task"]["sha256"] = "0" * 64  # a folder of another task under this digest
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError) as e:
        protocol.fit(tiny_mlp(), train, console=Console(quiet=True))
    assert str(e.value) == (f"{checkpoint.latest(run)}: this checkpoint holds another fine-tune (differs in: task); "
                            f"it is not resumed: remove {run} or set another checkpoint_dir")


# --- per-family defaults: BiT's SGD for convnets, MAE/BEiT's AdamW + layer-wise lr decay for transformers


def _vit():
    from bigmodel.architectures.vit import ViT
    return ViT("nano", image_size=16, patch_size=4, in_chans=1, global_pool="avg")


def test_each_family_gets_its_optimiser_and_a_key_overrides_it():
    from bigmodel.transfer.finetune import FAMILY_DEFAULTS
    assert (ResNet(depth=18, width=0.25, in_chans=1).family, _vit().family, LSTM(16, 4, 1).family) == \
        ("convnet", "transformer", "recurrent")
    assert Finetune().batch_size == 128  # every family's (DEFAULT_BATCH)
    assert Finetune().family_settings("convnet") == {"optimizer": "sgd", "base_lr": 0.4,
                                                        "weight_decay": 0.0,
                                                        "layer_decay": 1.0, "drop_path": 0.0, "grad_clip": None,
                                                        "decay": "step", "bit_crop": True}
    assert Finetune().family_settings("transformer") == FAMILY_DEFAULTS["transformer"]
    assert Finetune(optimizer="sgd", base_lr=0.1).family_settings("transformer")["optimizer"] == "sgd"
    s = Finetune(batch_size=128).schedule(5_000, 28, 28, "transformer")
    assert s.lr == FAMILY_DEFAULTS["transformer"]["base_lr"] * 128 / 512
    assert s.weight_decay == FAMILY_DEFAULTS["transformer"]["weight_decay"]
    assert Finetune(batch_size=128).schedule(5_000, 28, 28).lr == 0.1  # a convnet's without a family
    t = Finetune(schedule_scale=0.05).schedule(60_000, 28, 28, "transformer")  # AdamW at the default batch
    assert (t.batch_size, t.steps, t.lr) == (128, 2000, 8e-3 * 128 / 512)
    c = Finetune(schedule_scale=0.05).schedule(60_000, 28, 28)  # convnets: BiT's SGD and lr, batch 128 too
    assert (c.batch_size, c.steps, c.lr, c.decay) == (128, 2000, 0.4 * 128 / 512, "step")
    assert Finetune(schedule_scale=0.05, batch_size=512).schedule(60_000, 28, 28).steps == 500  # BiT's own batch
    r = Finetune(schedule_scale=0.05).schedule(60_000, 14, 14, "recurrent")  # the LSTM: 128 too, the same images
    assert (r.batch_size, r.steps, r.lr, r.decay) == (128, 2000, 8e-3 * 128 / 512, "cosine")
    # the training view: BiT's upscale-then-crop for convnets, the backbone's size for transformers
    assert Finetune().schedule(5_000, 28, 28).resize == 35
    assert Finetune().schedule(5_000, 28, 28, "transformer").resize == 28
    assert Finetune(bit_crop=True).schedule(5_000, 28, 28, "transformer").resize == 35
    assert Finetune(resize=32).schedule(5_000, 28, 28, "transformer").resize == 32
    assert Finetune().schedule(5_000, 28, 28, "transformer").decay == "cosine"
    cos = Finetune(steps=10, warmup_steps=2).schedule(5_000, 28, 28, "transformer")
    assert [round(cos.lr_at(k) / cos.lr, 4) for k in range(10)] == [0.5, 1.0, 1.0, 0.9619, 0.8536, 0.6913, 0.5,
                                                                     0.3087, 0.1464, 0.0381]


def test_transformer_layers_get_decayed_learning_rates_and_matrices_alone_are_decayed():
    """MAE's layer ids: embeddings 0, block i → i + 1, head L + 1 at the full lr; lr_scale = decay^(L+1-id)."""
    from bigmodel.transfer.finetune import optimiser
    bb = _vit()
    depth, d = len(bb.vit.blocks), 0.5
    model = Classifier(bb, 10, hyperrule(1000, image_size=16))
    opt = optimiser(model, model.schedule, {"optimizer": "adamw", "layer_decay": d})
    assert isinstance(opt, torch.optim.AdamW)
    name = {id(p): n for n, p in model.named_parameters()}
    scale = {name[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert len(scale) == len(list(model.parameters()))  # every parameter trains, once
    assert scale["head.weight"] == (1.0, 0.0) and scale["head.bias"] == (1.0, 0.0)  # schedule's wd: 0
    assert scale["backbone.vit.pos_embed"][0] == d ** (depth + 1)
    assert scale["backbone.vit.patch_embed.proj.weight"][0] == d ** (depth + 1)
    for i in range(depth):
        assert scale[f"backbone.vit.blocks.{i}.attn.qkv.weight"][0] == d ** (depth - i)
    assert scale["backbone.vit.norm.weight"][0] == d  # with the top block
    wd = Classifier(bb, 10, hyperrule(1000, image_size=16))
    opt = optimiser(wd, dataclasses.replace(wd.schedule, weight_decay=0.05), {"optimizer": "adamw", "layer_decay": d})
    decay = {name_: g["weight_decay"] for g in opt.param_groups
             for name_, p in wd.named_parameters() if any(p is q for q in g["params"])}
    assert decay["backbone.vit.blocks.0.attn.qkv.weight"] == decay["head.weight"] == 0.05
    assert decay["backbone.vit.blocks.0.attn.qkv.bias"] == decay["backbone.vit.pos_embed"] == 0.0
    assert decay["backbone.vit.cls_token"] == decay["backbone.vit.norm.weight"] == 0.0


def test_sgd_takes_layer_decay_too():
    from bigmodel.transfer.finetune import optimiser
    model = Classifier(_vit(), 10, hyperrule(1000, image_size=16))
    plain = optimiser(model, model.schedule, {"optimizer": "sgd", "layer_decay": 1.0})
    assert isinstance(plain, torch.optim.SGD) and len(plain.param_groups) == 1  # BiT: every weight alike
    decayed = optimiser(model, model.schedule, {"optimizer": "sgd", "layer_decay": 0.5})
    assert isinstance(decayed, torch.optim.SGD)
    assert sorted({g["lr_scale"] for g in decayed.param_groups}) == [0.5 ** e for e in range(5, -1, -1)]


def test_the_loop_applies_each_groups_scale_to_the_scheduled_lr(monkeypatch):
    seen = []
    real = trainer.train_step

    def step(model, opt, *args, **kwargs):  # the lrs the loop set for this step, per group
        seen.append(sorted({(g["lr_scale"], g["lr"]) for g in opt.param_groups}))
        return real(model, opt, *args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step)
    ft = Finetune(steps=3, batch_size=16, layer_decay=0.5)
    model, s = ft.fit(_vit(), digits("train"), console=Console(quiet=True))
    depth = len(model.backbone.vit.blocks)
    for k, groups in enumerate(seen):
        assert groups == [(0.5 ** e, s.lr_at(k) * 0.5 ** e) for e in range(depth + 1, -1, -1)]  # head: e = 0


def test_drop_path_rises_over_the_blocks_and_is_off_at_test_time():
    bb = _vit()
    x = torch.randn(4, 1, 16, 16)
    before = bb.eval()(x)
    bb.set_drop_path(0.3)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in bb.vit.blocks]
    assert rates == pytest.approx([0.3 * i / (len(rates) - 1) for i in range(len(rates))])
    assert torch.equal(bb.eval()(x), before)
    with pytest.raises(ValueError, match="no transformer blocks"):
        ResNet(depth=18, width=0.25, in_chans=1).set_drop_path(0.1)


def test_layer_decay_on_a_backbone_without_layers_is_refused_by_name(tiny_mlp):
    with pytest.raises(ValueError, match="layer_decay=0.5 needs a backbone whose layers are grouped"):
        Finetune(steps=1, optimizer="adamw", layer_decay=0.5).fit(tiny_mlp(), digits("train"))


def test_a_transformer_finetune_with_its_defaults_resumes_to_the_same_weights(monkeypatch, tmp_path):
    """AdamW's per-group state and stochastic depth's draws (drop_path 0.1 by default) survive a kill."""
    train = digits("train")
    torch.manual_seed(0)
    bb = _vit()
    ft = dict(steps=6, batch_size=32, checkpoint_every=3)
    whole, _ = Finetune(**ft).fit(bb, train, console=Console(quiet=True))
    protocol = Finetune(**ft, checkpoint_dir=str(tmp_path / "ft"))
    calls = _counting(monkeypatch, fail_at=5)  # dies in step 5, after the checkpoint of step 3
    with pytest.raises(RuntimeError, match="killed"):
        protocol.fit(bb, train, console=Console(quiet=True))
    calls.clear()
    resumed, _ = protocol.fit(bb, train, console=Console(quiet=True))
    assert len(calls) == 3
    a, b = _weights(whole), _weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["backbone.vit.blocks.0.attn.qkv.weight"], bb.vit.blocks[0].attn.qkv.weight)


def _igpt():
    from bigmodel.architectures.igpt import IGPT
    torch.manual_seed(0)
    return IGPT({"width": 16, "depth": 2, "heads": 2}, image_size=6, in_chans=1, colours=4)


def test_generative_weight_adds_igpts_next_pixel_loss_on_the_pooled_positions():
    """L = L_CLF + w · L_GEN (iGPT §3.4), against a by-hand reference; the class logits stay head(backbone(x))."""
    import torch.nn.functional as F
    bb = _igpt()
    s = Finetune(steps=2).schedule(1000, 6, 8, "transformer")
    model = Classifier(bb, 3, s, generative_weight=0.5)
    with torch.no_grad():
        model.head.weight.normal_()  # a non-zero class head, so the class term depends on the features
    x, labels = torch.randn(4, 1, 6, 6), torch.tensor([0, 2, 1, 2])
    out = model([x], labels)
    with torch.no_grad():
        features, tokens = bb.forward_features(x), bb.tokens(x)
        cls = F.cross_entropy(model.head(features.mean(1)), labels)
        logp = model.gen_head(features).log_softmax(-1)  # (B, T, 4)
        gen = -sum(logp[b, t, tokens[b, t]] for b in range(4) for t in range(36)) / (4 * 36)
    assert out["gen_loss"].item() == pytest.approx(gen.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(cls.item() + 0.5 * gen.item(), rel=1e-6)
    assert torch.equal(model.logits(x), model.head(bb(x)))
    # position t's features have seen tokens < t only: changing pixel 20 leaves positions 0..20 alone
    x2 = x.clone()
    x2[:, 0, 3, 2] = -x2[:, 0, 3, 2].sign()  # raster position 3 * 6 + 2 = 20, to another colour
    assert not torch.equal(bb.tokens(x2)[:, 20], tokens[:, 20])
    with torch.no_grad():
        f2 = bb.forward_features(x2)
    assert torch.equal(f2[:, :21], features[:, :21]) and not torch.allclose(f2[:, 21], features[:, 21])
    plain = Classifier(bb, 3, s)
    assert plain.gen_head is None and "gen_loss" not in plain([x], labels)


def test_generative_weight_needs_a_causal_token_model():
    s = hyperrule(1000, image_size=16)
    with pytest.raises(ValueError, match=r"generative_weight=1.0 needs a causal model of pixel tokens .* not ViT"):
        Classifier(_vit(), 10, s, generative_weight=1.0)
    with pytest.raises(ValueError, match="not LSTM"):
        Classifier(LSTM(16, 4, 1), 10, s, generative_weight=1.0)  # over patches, bidirectional
    assert Classifier(LSTM(8, 1, 1, hidden=8, causal=True, colours=4), 10, s, generative_weight=1.0).gen_head


def test_generative_weight_defaults_to_igpts_joint_objective_on_pixel_token_models_only():
    """Unset, w is 1 where the backbone predicts pixels (measured: pixel-lstm 98.41 → 98.88 on MNIST) and
    0 elsewhere; the default and the same value given are one fine-tune (one identity: each resumes the other)."""
    train = digits("train")
    cases = [(_igpt(), 1.0), (LSTM(8, 1, 1, hidden=8, causal=True, colours=4), 1.0), (LSTM(16, 4, 1), 0.0),
             (_vit(), 0.0)]
    for bb, w in cases:
        default, given = Finetune(steps=2), Finetune(steps=2, generative_weight=w)
        s = default.schedule(len(train), bb.image_size, 8, bb.family)
        assert default.joint_weight(bb) == w and default.identity(bb, train, 0, s)["generative_weight"] == w
        assert default.identity(bb, train, 0, s) == given.identity(bb, train, 0, s)
    assert Finetune(generative_weight=0).joint_weight(_igpt()) == 0.0  # given, it is used as given
    model, _ = Finetune(steps=1, batch_size=8).fit(_igpt(), train, console=Console(quiet=True))
    assert model.gen_head is not None and model.generative_weight == 1.0


def test_igpt_fine_tunes_through_all_its_blocks_by_default_and_probes_keep_the_middle_one():
    """iGPT fine-tunes its last layer and probes a middle one (Chen et al., 2020, §3.3–3.4; measured on MNIST
    with igpt size small: middle block 98.03, every block 98.92): unset, ``feature_layer`` is the depth; the
    caller's backbone keeps its own; the identity and the result record the blocks used, other backbones' not."""
    train, test = digits("train"), digits("test")
    bb = _igpt()  # depth 2; the architecture's feature_layer (its probes' block): 1
    assert (bb.feature_layer, Finetune().blocks_run(bb), Finetune(feature_layer=1).blocks_run(bb)) == (1, 2, 1)
    s = Finetune(steps=1).schedule(len(train), 6, 8, "transformer")
    assert Finetune(steps=1).identity(bb, train, 0, s)["feature_layer"] == 2
    for other in (_vit(), LSTM(8, 1, 1, hidden=8, causal=True, colours=4)):
        assert Finetune().blocks_run(other) is None and "feature_layer" not in Finetune().identity(other, train, 0, s)
        with pytest.raises(ValueError, match=f"feature_layer=1 needs .* {type(other).__name__} has none"):
            Finetune(feature_layer=1).blocks_run(other)
    with pytest.raises(ValueError, match=r"feature_layer=3 exceeds the depth \(2\)"):
        Finetune(feature_layer=3).blocks_run(bb)
    bb.architecture = {"name": "igpt", "size": {"width": 16, "depth": 2, "heads": 2}, "image_size": 6, "colours": 4}
    result = Finetune(steps=1, batch_size=8).run(bb, train, test)
    assert result["optimizer"]["feature_layer"] == 2
    assert bb.feature_layer == 1 and "feature_layer" not in bb.architecture  # the caller's backbone is untouched
    model, _ = Finetune(steps=1, batch_size=8).fit(bb, train, console=Console(quiet=True))
    assert model.backbone.feature_layer == 2 and model.backbone.architecture["feature_layer"] == 2
    x = torch.randn(4, 1, 6, 6)
    with torch.no_grad():  # the pooled features are the last block's, where the probes read the first's
        assert torch.equal(model.backbone(x), model.backbone.block_features(x)[-1][1])
        assert not torch.allclose(model.backbone(x), model.backbone.block_features(x)[0][1])
    middle, _ = Finetune(steps=1, batch_size=8, feature_layer=1).fit(bb, train, console=Console(quiet=True))
    assert middle.backbone.feature_layer == 1


def test_a_generative_finetune_trains_both_heads_at_the_full_lr_and_resumes_exactly(monkeypatch, tmp_path):
    from bigmodel.transfer.finetune import optimiser
    bb, train = _igpt(), digits("train")
    model = Classifier(bb, 10, hyperrule(1000, image_size=6), generative_weight=1.0)
    opt = optimiser(model, model.schedule, {"optimizer": "adamw", "layer_decay": 0.5})
    name = {id(p): n for n, p in model.named_parameters()}
    scale = {name[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert len(scale) == len(list(model.parameters()))  # every parameter trains, once
    assert scale["gen_head.weight"] == scale["gen_head.bias"] == scale["head.weight"] == 1.0
    ft = dict(steps=4, batch_size=16, checkpoint_every=2, generative_weight=1.0)
    whole, _ = Finetune(**ft).fit(bb, train, console=Console(quiet=True))
    protocol = Finetune(**ft, checkpoint_dir=str(tmp_path / "ft"))
    _counting(monkeypatch, fail_at=3)
    with pytest.raises(RuntimeError, match="killed"):
        protocol.fit(bb, train, console=Console(quiet=True))
    monkeypatch.undo()
    resumed, _ = protocol.fit(bb, train, console=Console(quiet=True))
    a, b = _weights(whole), _weights(resumed)
    assert "gen_head.weight" in a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = Finetune(**{**ft, "generative_weight": 0.5}).identity(bb, train, 0, protocol.schedule(len(train), 6, 8))
    assert other != protocol.identity(bb, train, 0, protocol.schedule(len(train), 6, 8))  # never resumes a w=1 one
