"""LSTM over patch/pixel sequences: bidirectional features, and a causal token model."""

from __future__ import annotations

import torch

from bigmodel.architectures.base import CAUSAL
from bigmodel.architectures.lstm import LSTM


def test_capabilities_follow_the_settings() -> None:
    assert LSTM.capabilities() == set()
    assert LSTM.capabilities(causal=True, patch_size=1) == {CAUSAL}
    assert LSTM.capabilities(causal=True, patch_size=4) == set()  # a unidirectional extractor, no vocabulary


def test_bidirectional_features_see_the_whole_image() -> None:
    torch.manual_seed(0)
    net = LSTM(image_size=8, patch_size=2, in_chans=1, hidden=8, layers=2).eval()
    x = torch.randn(2, 1, 8, 8)
    feats = net.forward_features(x)
    assert feats.shape == (2, 16, 16) and net.feature_dim == 16
    y = x.clone()
    y[..., -2:, -2:] += 1.0  # the last patch in raster order
    assert not torch.allclose(net.forward_features(y)[:, 0], feats[:, 0])  # reaches the first step


def test_causal_token_model_is_causal() -> None:
    """forward_tokens: changing token t changes no output at positions ≤ t (position t predicts
    token t from tokens < t, behind the start token) and does change position t + 1."""
    torch.manual_seed(0)
    net = LSTM(image_size=4, patch_size=1, in_chans=1, hidden=8, layers=2, causal=True, colours=5).eval()
    tokens = torch.randint(0, 5, (3, 16))
    h = net.forward_tokens(tokens)
    assert h.shape == (3, 16, 8)
    for t in (0, 7, 14):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 5
        h2 = net.forward_tokens(changed)
        torch.testing.assert_close(h2[:, : t + 1], h[:, : t + 1], rtol=0, atol=0)
        assert not torch.allclose(h2[:, t + 1], h[:, t + 1])


def test_causal_features_come_from_quantised_pixels() -> None:
    torch.manual_seed(0)
    net = LSTM(image_size=4, patch_size=1, in_chans=1, hidden=8, layers=1, causal=True, colours=5).eval()
    x = torch.rand(2, 1, 4, 4) * 2 - 1
    quantised = net.decode(net.tokens(x))
    torch.testing.assert_close(net(x), net(quantised))
    assert net(x).shape == (2, 8)
