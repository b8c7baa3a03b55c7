"""ImageGPT: causal over colour tokens, features from normalised images, palette in checkpoints."""

from __future__ import annotations

import torch

from bigmodel.architectures.base import CAUSAL
from bigmodel.architectures.igpt import IGPT
from bigmodel.data.base import TensorImages
from bigmodel.objectives.autoregressive import Autoregressive
from bigmodel.train import checkpoint


def _igpt(**kw) -> IGPT:
    torch.manual_seed(0)
    return IGPT(size="tiny", image_size=4, in_chans=1, colours=6, **kw).eval()


def test_causality_with_the_start_token_shift() -> None:
    """forward_tokens: changing token t changes no output at positions ≤ t (position t predicts
    token t from tokens < t, behind the start token) and does change every later position."""
    net = _igpt()
    assert IGPT.capabilities() == {CAUSAL}
    tokens = torch.randint(0, 6, (2, 16))
    h = net.forward_tokens(tokens)
    assert h.shape == (2, 16, net.token_dim)
    for t in (0, 5, 14):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 6
        h2 = net.forward_tokens(changed)
        torch.testing.assert_close(h2[:, : t + 1], h[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.isclose(h2[:, t + 1:], h[:, t + 1:], atol=1e-6).all(-1).any()


def test_features_of_normalised_images() -> None:
    net = _igpt(feature_layer=2)
    x = torch.rand(3, 1, 4, 4) * 2 - 1
    assert net(x).shape == (3, net.feature_dim)
    torch.testing.assert_close(net(x), net(net.decode(net.tokens(x))))  # quantised inside
    assert net.forward_features(x).shape == (3, 16, net.token_dim)


def test_palette_is_fitted_saved_and_restored(tmp_path) -> None:
    net = _igpt()
    g = torch.Generator().manual_seed(0)
    levels = torch.tensor([0, 40, 90, 150, 200, 255], dtype=torch.uint8)
    images = levels[torch.randint(0, 6, (64, 1, 4, 4), generator=g)]
    obj = Autoregressive(net, palette_images=64)
    assert not net.palette.fitted
    obj.setup(TensorImages(images, torch.full((64,), -1)))
    assert net.palette.fitted
    fitted = net.palette.colours.clone()
    torch.testing.assert_close(fitted[:, 0], levels.float() / 127.5 - 1, atol=1e-4, rtol=0)  # six grey levels, sorted

    ckpt = checkpoint.save(tmp_path, 1, obj, {"step": 1}, {})
    fresh = IGPT(size="tiny", image_size=4, in_chans=1, colours=6)
    assert not torch.equal(fresh.palette.colours, fitted)
    checkpoint.load_weights(ckpt, fresh, prefix="backbone.")
    torch.testing.assert_close(fresh.palette.colours, fitted)
    assert fresh.palette.fitted


def test_size_given_by_its_numbers() -> None:
    """``size`` is a name or ``{width, depth, heads}``; the recipe validator refuses a bad one in one line."""
    import re

    import pytest

    from bigmodel.recipe import RecipeError, resolve
    from bigmodel.train import build

    recipe = resolve("igpt", ["run.tiny=true", "architecture.size={width: 48, depth: 3, heads: 6}"])
    net = build.backbone(recipe.architecture)
    assert (net.feature_dim, len(net.blocks), net.blocks[0].attn.num_heads) == (48, 3, 6)
    assert net.feature_layer == 1  # depth // 2
    assert IGPT(size="small").feature_dim == 128
    bad = {"huge": "expected one of 'tiny', 'small' or {width, depth, heads}",
           "{width: 50, depth: 3, heads: 6}": "width=50 is not divisible by heads=6",
           "{width: 48, depth: 3}": "heads: field required",
           "{width: 48, depth: 0, heads: 6}": "depth: input should be greater than or equal to 1",
           "{width: 48, depth: 3, heads: 6, layers: 2}": "layers: extra inputs are not permitted"}
    for value, message in bad.items():
        with pytest.raises(RecipeError, match="^architecture.size = .*: " + re.escape(message)):
            resolve("igpt", [f"architecture.size={value}"])
