"""Next-pixel prediction over colour tokens, on igpt and on a causal lstm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bigmodel.architectures.igpt import IGPT
from bigmodel.architectures.lstm import LSTM
from bigmodel.data.base import TensorImages
from bigmodel.objectives.autoregressive import Autoregressive


def _objective(kind: str) -> Autoregressive:
    torch.manual_seed(0)
    if kind == "igpt":
        net = IGPT(size="tiny", image_size=4, in_chans=1, colours=4)
    else:
        net = LSTM(image_size=4, patch_size=1, in_chans=1, hidden=16, layers=1, causal=True, colours=4)
    obj = Autoregressive(net, palette_images=32)
    g = torch.Generator().manual_seed(0)
    images = torch.tensor([0, 80, 170, 255], dtype=torch.uint8)[torch.randint(0, 4, (32, 1, 4, 4), generator=g)]
    obj.setup(TensorImages(images, torch.full((32,), -1)))
    return obj


@pytest.mark.parametrize("kind", ["igpt", "lstm"])
def test_loss_matches_a_prefix_by_prefix_reference(kind: str) -> None:
    """Cross-entropy of token t given tokens < t, each computed from the prefix alone."""
    obj = _objective(kind).eval()
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    tokens = obj.backbone.tokens(x)
    ref = torch.stack([F.cross_entropy(obj.logits(tokens[:, : t + 1])[:, t], tokens[:, t], reduction="none")
                       for t in range(16)], 1).mean()
    out = obj([x], torch.full((2,), -1))
    torch.testing.assert_close(out["loss"], ref, atol=1e-5, rtol=1e-5)
    assert out["bits_per_token"] == pytest.approx(out["loss"].item() / 0.6931471805599453)


@pytest.mark.parametrize("kind", ["igpt", "lstm"])
def test_forward_backward_sample_and_complete(kind: str) -> None:
    obj = _objective(kind)
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    out = obj([x], torch.full((3,), -1))
    out["loss"].backward()
    assert obj.head.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in obj.backbone.named_parameters() if "start_token" in n)

    g = torch.Generator().manual_seed(0)
    samples = obj.sample(2, generator=g)
    assert samples.shape == (2, 1, 4, 4)
    assert torch.isin(samples, obj.backbone.palette.colours).all()  # palette colours only
    images = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    done = obj.complete(images, generator=g)
    upper = obj.backbone.decode(obj.backbone.tokens(obj.to_input(images)))[..., :2, :]
    torch.testing.assert_close(done[..., :2, :], upper)  # the upper half is kept
    assert obj.training  # sampling restores the mode


@pytest.mark.parametrize("override", ["architecture.causal=false", "architecture.patch_size=2"])
def test_resolve_refuses_a_non_causal_lstm(override: str) -> None:
    from bigmodel.recipe import RecipeError, resolve

    with pytest.raises(RecipeError, match="'autoregressive' cannot train architecture 'lstm': it needs causal"):
        resolve("pixel-lstm", [override])


def test_igpt_pretrains_on_shards(tmp_path) -> None:
    """The palette of a stream comes from its first batches (it cannot be indexed): the same
    images a one-process reader gets with ``palette_seed``, the same palette on every setup; and
    a few steps of igpt pretraining run on shards written by ``write_shards``."""
    import json

    from rich.console import Console

    from bigmodel.commands.pretrain import pretrain
    from bigmodel.data.shards import Shards, write_shards
    from bigmodel.objectives.autoregressive import palette_sample
    from bigmodel.recipe import validate
    from bigmodel.train import build

    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([0, 60, 120, 180, 255], dtype=torch.uint8)
    images = levels[torch.randint(0, 5, (40, 1, 6, 6), generator=g)]
    write_shards(TensorImages(images, torch.full((40,), -1)), tmp_path / "shards", "train", 10)

    stream = Shards(str(tmp_path / "shards"), streams=2, shuffle=4)
    first = next(stream.step_batches(range(1), 20, 3, rank=0, world=1))[0]  # step 0, batch 20, seed 3
    assert torch.equal(palette_sample(stream, 20, seed=3), first)
    assert len(palette_sample(stream, 500, seed=3)) == 40  # at most the corpus

    recipe = validate({
        "architecture": {"name": "igpt", "size": "tiny", "image_size": 6, "in_chans": 1, "colours": 4},
        "data": {"name": "shards", "urls": str(tmp_path / "shards"), "streams": 2, "shuffle": 4},
        "objective": {"name": "autoregressive", "palette_images": 20, "palette_seed": 3},
        "optim": {"batch_size": 8, "steps": 3, "warmup_steps": 1},
        "run": {"out": str(tmp_path / "run"), "checkpoint_every": 3, "log_every": 1}})
    data, model = build.experiment(recipe)
    (tmp_path / "run").mkdir()
    summary = pretrain(recipe, tmp_path / "run", data, model, Console(quiet=True))
    assert summary["steps_done"] == 3 and bool(model.backbone.palette.fitted)

    reference = IGPT(size="tiny", image_size=6, in_chans=1, colours=4).palette  # k-means on those 20 images' pixels
    reference.fit(model.to_input(first).permute(0, 2, 3, 1).reshape(-1, 1), seed=3)
    torch.testing.assert_close(model.backbone.palette.colours.cpu(), reference.colours, rtol=0, atol=0)
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
