"""V-MoE mixture-of-experts MLPs: top-k routing within capacity, load-balancing loss, recipe keys."""

from __future__ import annotations

import math

import pytest
import torch

from bigmodel.architectures.moe import MoEConfig, MoEMlp
from bigmodel.architectures.vit import ViT
from bigmodel.objectives.mae import MAE
from bigmodel.objectives.supervised import Supervised
from bigmodel.recipe import RecipeError, resolve


def _layer(experts: int = 4, top_k: int = 2, capacity_factor: float = 1.0) -> MoEMlp:
    torch.manual_seed(0)
    return MoEMlp(16, 32, MoEConfig(experts=experts, top_k=top_k, capacity_factor=capacity_factor))


def test_each_token_goes_to_its_top_k_experts_when_capacity_allows() -> None:
    layer = _layer(capacity_factor=100.0)
    r = layer.route(torch.randn(40, 16))
    assert r.expert.shape == (40, 2)
    assert r.kept.all()
    assert (r.expert[:, 0] != r.expert[:, 1]).all()  # k distinct experts
    torch.testing.assert_close(r.expert, r.probs.topk(2, -1).indices)
    torch.testing.assert_close(r.gate, r.probs.gather(1, r.expert))


def test_capacity_is_respected_and_first_choices_are_served_first() -> None:
    layer = _layer(capacity_factor=0.5)
    s = 64
    r = layer.route(torch.randn(s, 16))
    assert r.capacity == math.ceil(0.5 * 2 * s / 4)
    for e in range(4):
        chosen = r.expert == e
        kept = int((chosen & r.kept).sum())
        assert kept == min(int(chosen.sum()), r.capacity)  # fill up to capacity, never beyond
        first, second = chosen[:, 0], chosen[:, 1]
        if (second & r.kept[:, 1]).any():  # a second choice is kept only if every first choice was
            assert r.kept[first, 0].all()
        # within a rank, earlier tokens are served first
        kept_first = r.kept[first, 0]
        assert torch.equal(kept_first, kept_first.sort(descending=True).values)


def test_dropped_tokens_pass_through_unchanged() -> None:
    """A token whose every choice is over capacity gets no MoE output (the residual carries it)."""
    layer = _layer(top_k=1, capacity_factor=0.1)
    x = torch.randn(1, 50, 16)
    out = layer(x)[0]
    r = layer.route(x[0])
    dropped = ~r.kept.any(1)
    assert dropped.any() and (~dropped).any()
    assert (out[dropped] == 0).all()
    assert (out[~dropped].abs().sum(1) > 0).all()
    # kept tokens get gate × expert(token)
    i = int(torch.nonzero(~dropped)[0])
    ref = r.gate[i, 0] * layer.experts[int(r.expert[i, 0])](x[0, i])
    torch.testing.assert_close(out[i], ref)


def test_vit_moe_blocks_and_aux_loss() -> None:
    torch.manual_seed(0)
    net = ViT(size="nano", image_size=16, patch_size=4, in_chans=1,
              moe={"experts": 4, "top_k": 2, "every": 2, "aux_weight": 0.5})
    assert net.moe_blocks == [1, 3]
    assert isinstance(net.vit.blocks[1].mlp, MoEMlp) and not isinstance(net.vit.blocks[0].mlp, MoEMlp)
    x = torch.randn(4, 1, 16, 16)
    net(x)
    assert net.aux_loss() == 0.0  # not recording outside an objective: no graph kept alive
    net.record_aux_loss(True)
    net(x)
    net(x)  # two passes (e.g. two views): both recorded
    aux = net.aux_loss()
    assert torch.isfinite(aux) and aux > 0
    assert aux.item() == pytest.approx(2 * 2 * 0.5 * 1.0, rel=0.5)  # 2 passes × 2 layers × weight × ≈1
    aux.backward()
    assert net.vit.blocks[1].mlp.router.weight.grad.abs().sum() > 0
    net.record_aux_loss(False)
    assert net.aux_loss() == 0.0


@pytest.mark.parametrize("objective", ["mae", "supervised"])
def test_every_objective_adds_the_aux_loss(objective: str) -> None:
    """The Objective base adds the backbone's auxiliary loss, whatever the objective."""
    torch.manual_seed(0)
    net = ViT(size="nano", image_size=16, patch_size=4, in_chans=1, moe={"experts": 4, "every": 1})
    obj = MAE(net) if objective == "mae" else Supervised(net, num_classes=3)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0])
    torch.manual_seed(1)
    out = obj([x], y)
    assert out["aux_loss"] > 0
    torch.manual_seed(1)
    base = type(obj).forward(obj, [x], y)["loss"]  # the objective's own loss, without hooks
    torch.testing.assert_close(out["loss"], base + out["aux_loss"])
    out["loss"].backward()
    assert net.vit.blocks[0].mlp.router.weight.grad is not None
    assert net.aux_loss() == 0.0  # recording ends with the objective's forward


def test_moe_recipe_keys_are_validated() -> None:
    r = resolve("mae-vit-moe", ["architecture.moe.experts=6", "architecture.moe.top_k=1"])
    assert r.architecture.kwargs["moe"]["experts"] == 6
    with pytest.raises(RecipeError, match=r"architecture\.moe\.expert: unknown key; valid keys: experts"):
        resolve("mae-vit-moe", ["architecture.moe.expert=6"])
    with pytest.raises(RecipeError, match=r"architecture\.moe.*top_k=5 exceeds experts=4"):
        resolve("mae-vit-moe", ["architecture.moe.top_k=5"])
    with pytest.raises(RecipeError, match=r"architecture\.moe\.capacity_factor = 0"):
        resolve("mae-vit-moe", ["architecture.moe.capacity_factor=0"])


def test_eval_serves_every_choice_whatever_the_capacity() -> None:
    """In evaluation no choice is dropped: each token gets Σ_k gate_k · expert_k(token), even where the
    training capacity would drop most of them; training keeps the capacity."""
    layer = _layer(top_k=2, capacity_factor=0.1)
    x = torch.randn(1, 50, 16)
    r = layer.route(x[0])
    assert not r.kept.all()  # the training capacity drops choices here...
    assert (layer.train()(x)[0] == 0).all(1).any()  # ...and training output leaves dropped tokens at 0
    out = layer.eval()(x)[0]
    ref = torch.stack([sum(r.gate[i, j] * layer.experts[int(r.expert[i, j])](x[0, i]) for j in range(2))
                       for i in range(50)])
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_eval_features_do_not_depend_on_batch_mates() -> None:
    """An image's V-MoE features are the same alone, first and last in a batch of 64 (with a
    batch-wide capacity they moved by ~1% with the batch-mates)."""
    torch.manual_seed(0)
    net = ViT(size="nano", image_size=16, patch_size=4, in_chans=3,
              moe={"experts": 4, "top_k": 2, "every": 2}).eval()
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        alone = net(x[:1])
        first = net(x)[:1]
        last = net(torch.cat([x[1:], x[:1]]))[-1:]
    # 1e-5: a batch of 64 and a batch of 1 take different matrix-multiply kernels, 1.4e-6 apart on an
    # AVX-512 CPU without AMX; the batch-wide capacity this guards against moved features by ~1e-2
    torch.testing.assert_close(first, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(last, alone, atol=1e-5, rtol=0)
    with torch.no_grad():  # training mode keeps V-MoE's batch-wide capacity (and so depends on the batch)
        assert not torch.allclose(net.train()(x)[:1], net(x[:1]), atol=1e-3, rtol=0)
