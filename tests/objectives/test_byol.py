"""BYOL: the loss against a naive per-image computation, the EMA against a naive per-parameter
update, the momentum schedule's values, the target without gradient, the views, every backbone
family, an exact resume of the zoo recipe, and 2 processes ending with the weights of 1."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from bigmodel import api
from bigmodel.architectures.resnet import ResNet
from bigmodel.architectures.vit import ViT
from bigmodel.commands.pretrain import pretrain
from bigmodel.objectives.byol import BYOL, byol_loss, solarize, target_momentum
from bigmodel.recipe import RecipeError, resolve, validate
from bigmodel.registry import ARCHITECTURES
from bigmodel.train import build, checkpoint
from bigmodel.train.run_dir import open_run

TIMM_TINY = {"model": "deit_tiny_patch16_224", "image_size": 16, "in_chans": 1,
             "model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}}


def naive_byol_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """BYOL eq. 2 and 5 image by image: ‖p̄ - z̄'‖² with x̄ = x / ‖x‖, for (p1, z2) plus (p2, z1),
    averaged over images, with plain Python arithmetic."""
    def unit(v):
        n = math.sqrt(sum(float(a) ** 2 for a in v))
        return [float(a) / n for a in v]

    def sq_dist(a, b):
        return sum((x - y) ** 2 for x, y in zip(unit(a), unit(b), strict=True))

    total = sum(sq_dist(p1[i], z2[i]) + sq_dist(p2[i], z1[i]) for i in range(len(p1)))
    return torch.tensor(total / len(p1), dtype=torch.float64)


def _images(c: int = 1, n: int = 8, size: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(c), dtype=torch.uint8)


def _byol(**kw) -> BYOL:
    torch.manual_seed(0)
    return BYOL(ResNet(depth=18, width=0.125, image_size=16, in_chans=1), proj_hidden=32, proj_dim=16, **kw)


def test_loss_equals_naive_per_image_computation():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(4))
    torch.testing.assert_close(byol_loss(p1, p2, z1, z2), naive_byol_loss(p1, p2, z1, z2))
    assert byol_loss(z2, z1, z1, z2).item() == pytest.approx(0.0, abs=1e-12)  # predictions on target: 0
    assert byol_loss(-z2, -z1, z1, z2).item() == pytest.approx(8.0, rel=1e-12)  # opposite: 2 · 4


def test_forward_is_the_loss_of_its_networks():
    """forward = the naive loss of online predictions (backbone → projector → predictor) against the
    target's projections (target backbone → target projector) of the other view."""
    obj = _byol()
    with torch.no_grad():
        for p in obj.target.parameters():  # make the two networks differ
            p.add_(0.01 * torch.randn_like(p))
    views = obj.views(_images(), torch.Generator().manual_seed(1))
    out = obj(views, torch.full((8,), -1))
    with torch.no_grad():
        x = torch.cat(views)
        p1, p2 = obj.predictor(obj.projector(obj.backbone(x))).chunk(2)
        z1, z2 = obj.target["projector"](obj.target["backbone"](x)).chunk(2)
    torch.testing.assert_close(out["loss"].double(),
                               naive_byol_loss(p1.double(), p2.double(), z1.double(), z2.double()),
                               rtol=1e-5, atol=1e-6)


def test_momentum_schedule_values():
    """τ_k = 1 - (1 - τ_base)(cos(πk/K) + 1)/2: τ_base at k = 0, halfway at K/2, 1 at K and after."""
    assert target_momentum(0, 100, 0.99) == pytest.approx(0.99, rel=1e-12)
    assert target_momentum(25, 100, 0.99) == pytest.approx(1 - 0.01 * (math.sqrt(0.5) + 1) / 2, rel=1e-12)
    assert target_momentum(50, 100, 0.99) == pytest.approx(0.995, rel=1e-12)
    assert target_momentum(100, 100, 0.996) == 1.0
    assert target_momentum(150, 100, 0.996) == 1.0
    assert [target_momentum(k, 4, 0.9) for k in range(5)] == pytest.approx(
        [0.9, 1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2, 0.95, 1 - 0.1 * (math.cos(3 * math.pi / 4) + 1) / 2, 1.0])
    obj = _byol(tau_base=0.9, momentum_steps=4)
    assert [obj.momentum(k) for k in range(5)] == [target_momentum(k, 4, 0.9) for k in range(5)]
    views = obj.views(_images(), torch.Generator().manual_seed(0))
    for k in range(5):  # forward reports the τ of the update after the step it is in
        obj.ema_steps.fill_(k)
        assert obj(views, torch.full((8,), -1))["momentum"].item() == pytest.approx(obj.momentum(k), rel=1e-6)


def test_ema_update_equals_naive_per_parameter_update():
    obj = _byol(tau_base=0.9, momentum_steps=10)
    with torch.no_grad():
        for p in [*obj.backbone.parameters(), *obj.projector.parameters(), *obj.predictor.parameters()]:
            p.add_(torch.randn_like(p))
    online = {k: v.clone() for k, v in obj.state_dict().items() if not k.startswith("target.")}
    before = {k: v.clone() for k, v in obj.target.state_dict().items()}
    obj.after_step(3)
    tau = 1 - 0.1 * (math.cos(math.pi * 3 / 10) + 1) / 2
    params = {n for n, _ in obj.target.named_parameters()}
    after = obj.target.state_dict()
    for name, t in before.items():
        if name in params:  # t ← τ t + (1 - τ) s, s the online parameter of the same name
            want = tau * t.double() + (1 - tau) * online[name].double()
            torch.testing.assert_close(after[name].double(), want, rtol=1e-6, atol=1e-7)
        else:  # buffers (BatchNorm running statistics) are the target's own
            assert torch.equal(after[name], t)
    assert all(torch.equal(v, online[k]) for k, v in obj.state_dict().items() if k in online and k != "ema_steps")
    assert obj.ema_steps.item() == 4 and "ema_steps" in obj.state_dict()


def test_target_starts_as_the_online_network_and_gets_no_gradient():
    obj = _byol()
    online = obj.backbone.state_dict() | {f"p.{k}": v for k, v in obj.projector.state_dict().items()}
    target = (obj.target["backbone"].state_dict()
              | {f"p.{k}": v for k, v in obj.target["projector"].state_dict().items()})
    assert online.keys() == target.keys() and all(torch.equal(online[k], target[k]) for k in online)
    out = obj(obj.views(_images(), torch.Generator().manual_seed(0)), torch.full((8,), -1))
    out["loss"].backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.target.parameters())
    assert all(p.grad is not None for p in [*obj.projector.parameters(), *obj.predictor.parameters()])
    opt = build.optimizer(obj, resolve("byol-resnet").optim)  # the optimizer never sees the target
    optimized = {id(p) for g in opt.param_groups for p in g["params"]}
    assert optimized == {id(p) for n, p in obj.named_parameters() if not n.startswith("target.")}


def test_predictor_lr_scale_gives_the_predictor_groups_of_its_own():
    """``predictor_lr_scale``: every predictor parameter, and only those, sits in a group with that
    ``lr_scale`` (weight decay kept apart as for every parameter); one AdamW step with the trainer's
    per-group lr moves a predictor weight exactly as a lone AdamW at lr × scale would."""
    optim = resolve("byol-resnet", ["optim.weight_decay=0.0"]).optim
    plain, scaled = _byol(), _byol(predictor_lr_scale=10.0)
    assert len(build.optimizer(plain, optim).param_groups) == 2  # unscaled: the two groups of every objective
    opt = build.optimizer(scaled, optim)
    pred = {id(p) for p in scaled.predictor.parameters()}
    for g in opt.param_groups:
        assert {id(p) in pred for p in g["params"]} <= {g.get("lr_scale", 1.0) == 10.0}
    assert [(g.get("lr_scale", 1.0), g["weight_decay"], len(g["params"])) for g in opt.param_groups][2:] == [
        (10.0, 0.0, 2), (10.0, 0.0, 3)]  # predictor: 2 matrices; bias of the last Linear + BatchNorm weight/bias
    w = scaled.predictor[0].weight
    ref = torch.nn.Parameter(w.detach().clone())
    out = scaled(scaled.views(_images(), torch.Generator().manual_seed(0)), torch.full((8,), -1))
    out["loss"].backward()
    ref.grad = w.grad.clone()
    for g in opt.param_groups:  # what the trainer does at every step
        g["lr"] = 1e-3 * g.get("lr_scale", 1.0)
    opt.step()
    lone = torch.optim.AdamW([ref], lr=1e-2, betas=optim.betas, weight_decay=0.0, fused=True)  # the same kernel
    lone.step()
    assert torch.equal(w.detach(), ref.detach())


def test_views_are_asymmetric_and_deterministic():
    """View 1 always blurred and never solarised, view 2 the reverse (probabilities 1/0 and 0/1):
    view 1 of the un-cropped, un-jittered input is its blur, view 2 its solarisation."""
    off = {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "flip_prob": 0.0, "jitter_prob": 0.0,
           "grayscale_prob": 0.0}
    obj = _byol(blur_prob=(1.0, 0.0), solarize_prob=(0.0, 1.0), blur_sigma=(1.0, 1.0), **off)
    images = _images()
    v1, v2 = obj.views(images, torch.Generator().manual_seed(3))
    w1, w2 = obj.views(images, torch.Generator().manual_seed(3))
    assert torch.equal(v1, w1) and torch.equal(v2, w2)
    x = images.float() / 255
    torch.testing.assert_close(v2, (torch.where(x >= 0.5, 1 - x, x) - 0.5) / 0.5)
    import torchvision.transforms.v2.functional as TF

    blurred = TF.gaussian_blur(x, kernel_size=[obj.blur_kernel] * 2, sigma=[1.0, 1.0])
    torch.testing.assert_close(v1, (blurred - 0.5) / 0.5, rtol=1e-5, atol=1e-5)
    plain = _byol(blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0), **off)
    for view in plain.views(images, torch.Generator().manual_seed(3)):
        torch.testing.assert_close(view, plain.to_input(images))


def test_solarize_matches_torchvision():
    import torchvision.transforms.v2.functional as TF

    x = torch.rand(4, 3, 5, 5)
    torch.testing.assert_close(solarize(x, torch.Generator().manual_seed(0), 1.0), TF.solarize(x, 0.5))
    assert torch.equal(solarize(x, torch.Generator().manual_seed(0), 0.0), x)


@pytest.mark.parametrize("arch", ["resnet", "vit", "timm"])
def test_every_family_takes_a_step_and_the_target_follows(arch):
    """resnet, vit and a timm model: a forward/backward/optimizer step, then after_step moves the
    target by exactly (1 - τ) of its distance to the online weights."""
    torch.manual_seed(0)
    net = {"resnet": lambda: ResNet(depth=18, width=0.125, image_size=16, in_chans=1),
           "vit": lambda: ViT(size="nano", image_size=16, patch_size=4, in_chans=1),
           "timm": lambda: ARCHITECTURES.build("timm", **TIMM_TINY)}[arch]()
    obj = BYOL(net, proj_hidden=32, proj_dim=16, tau_base=0.5, momentum_steps=2)
    opt = torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.1)
    out = obj(obj.views(_images(), torch.Generator().manual_seed(0)), torch.full((8,), -1))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    opt.step()
    before = [t.clone() for t in obj.target["backbone"].parameters()]
    obj.after_step(0)  # τ = 0.5: the midpoint
    moved = 0
    for t0, t, s in zip(before, obj.target["backbone"].parameters(), obj.backbone.parameters(), strict=True):
        torch.testing.assert_close(t, 0.5 * t0 + 0.5 * s)
        moved += not torch.equal(t, t0)
    assert moved > 0


def test_bad_settings_are_refused_naming_the_key():
    raw = {"architecture": {"name": "resnet", "depth": 18, "width": 0.125, "image_size": 16, "in_chans": 1},
           "data": {"name": "digits"}, "objective": {"name": "byol", "tau_base": 1.5}}
    with pytest.raises(RecipeError, match="objective.tau_base"):
        validate(raw)
    with pytest.raises(ValueError, match=r"objective.crop_scale=\[0.9, 0.5\]: need 0 < min <= max"):
        _byol(crop_scale=(0.9, 0.5))


# ---------------------------------------------------------------------------------------------
# The EMA state in checkpoints: stopped and resumed equals straight through


@pytest.mark.slow  # 8 s; test-all (CI) runs it; the EMA unit tests run in make test
def test_zoo_recipe_stopped_and_resumed_is_bit_exact(tmp_path, mnist_npz):
    """byol-resnet's tiny run, 4 steps straight vs stopped by SIGTERM after step 1 and resumed: the
    same weights (the target's and ema_steps included) and the same logged losses."""
    from tests.train.test_resume import sigterm_after

    def recipe(out: Path):
        return resolve("byol-resnet", ["run.tiny=true", "run.precision=fp32", "run.log_every=1",
                                       f"data.path={mnist_npz}", f"run.out={out}"])

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    quiet = Console(quiet=True)
    assert api.run_pipeline(recipe(whole), quiet, transfer=False)["pretrain"]["steps_done"] == 4
    with sigterm_after(1):
        assert api.run_pipeline(recipe(stopped), quiet, transfer=False)["pretrain"]["steps_done"] == 1
    assert load_file(str(checkpoint.latest(stopped) / "model.safetensors"))["ema_steps"].item() == 1
    resumed = api.run_pipeline(recipe(stopped), quiet, transfer=False)["pretrain"]
    assert (resumed["start_step"], resumed["steps_done"]) == (1, 4)  # report.json says where the call began
    a = load_file(str(checkpoint.latest(whole) / "model.safetensors"))
    b = load_file(str(checkpoint.latest(stopped) / "model.safetensors"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert a["ema_steps"].item() == 4
    target = [k for k in a if k.startswith("target.backbone.")]
    assert target and all(f"backbone.{k[len('target.backbone.'):]}" in a for k in target)
    assert any(not torch.equal(a[k], a[k.removeprefix("target.")]) for k in target)  # it lags the online network
    metrics = [[json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines() if ln.strip()]
               for d in (whole, stopped)]
    assert [m["loss"] for m in metrics[1]] == [m["loss"] for m in metrics[0]]
    tau_base = recipe(whole).objective.kwargs["tau_base"]
    assert [m["momentum"] for m in metrics[0]] == pytest.approx([target_momentum(k, 4, tau_base) for k in range(4)])


# ---------------------------------------------------------------------------------------------
# Two processes: the run of one


DIST = {"architecture": {"name": "vit", "size": "nano", "image_size": 16, "patch_size": 4, "in_chans": 1},
        "data": {"name": "fractals", "classes": 4, "images_per_class": 8, "image_size": 16, "channels": 1,
                 "points": 500},
        "objective": {"name": "byol", "proj_hidden": 32, "proj_dim": 16, "tau_base": 0.9, "momentum_steps": 4,
                      "crop_scale": [0.5, 1.0]},
        # SGD: linear in the gradient, so float noise stays noise (as tests/train/dist_cases.py)
        "optim": {"name": "sgd", "batch_size": 8, "steps": 4, "warmup_steps": 1, "lr": 0.05},
        "run": {"precision": "fp32", "checkpoint_every": 2, "log_every": 1, "seed": 3}}


def _train(out: Path, strategy: str = "ddp") -> None:
    r = validate({**DIST, "run": {**DIST["run"], "out": str(out), "strategy": strategy}})
    data, model = build.experiment(r)
    with open_run(r, Console(quiet=True)) as run_dir:
        pretrain(r, run_dir, data, model, Console(quiet=True))


def _rank(rank: int, world: int, port: int, out: str, strategy: str) -> None:
    from bigmodel.train import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with distributed.session():
        _train(Path(out), strategy)


@pytest.mark.slow  # a group of 2 processes; `make test-all`
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_end_with_the_weights_of_one(tmp_path, strategy):
    """DDP or FSDP2 on 2 processes (4 rows each, global BatchNorm in the projector and predictor of both
    networks) ends with the online and target weights of one process on the 8 rows: the EMA runs
    on every rank on the same synchronised online weights."""
    import torch.multiprocessing as mp

    from tests.train.dist_cases import free_port

    _train(tmp_path / "one")
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path / "two"), strategy), nprocs=2)
    one, two = (checkpoint.read_weights(checkpoint.latest(tmp_path / d)) for d in ("one", "two"))
    assert checkpoint.load_meta(checkpoint.latest(tmp_path / "two"))["world"] == 2
    assert one.keys() == two.keys() and any(k.startswith("target.") for k in one)
    worst = max((one[k].float() - two[k].float()).abs().max().item() for k in one)
    assert worst < 1e-5 and two["ema_steps"].item() == 4
    losses = [[json.loads(ln)["loss"] for ln in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the mean over the ranks is the loss of one process


def test_the_momentum_schedule_spans_the_run_unless_set():
    """Without ``momentum_steps`` the cosine spans the run's ``optim.steps`` (the framework passes it as
    ``total_steps``, to pretraining and to the loader alike); a recipe value wins. Changing
    ``optim.steps`` alone no longer leaves the schedule at another length."""
    objective = {k: v for k, v in DIST["objective"].items() if k != "momentum_steps"}
    for steps, given, expected in ((7, None, 7), (30, None, 30), (30, 3, 3)):
        section = {**objective, **({"momentum_steps": given} if given else {})}
        r = validate({**DIST, "objective": section, "optim": {**DIST["optim"], "steps": steps}})
        model = build.objective_for(r, build.backbone(r.architecture), 0)
        assert model.momentum_steps == expected
        assert model.momentum(expected) == 1.0 and model.momentum(0) == 0.9
