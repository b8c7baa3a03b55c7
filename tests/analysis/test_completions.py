"""Completion and sample figures of autoregressive models (igpt and causal lstm)."""

from __future__ import annotations

import pytest
import torch

from bigmodel.analysis import completions
from bigmodel.architectures.igpt import IGPT
from bigmodel.architectures.lstm import LSTM
from bigmodel.objectives.autoregressive import Autoregressive
from bigmodel.objectives.supervised import Supervised


def _images(n: int, channels: int = 1, side: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, channels, side, side), generator=torch.Generator().manual_seed(2),
                         dtype=torch.uint8)


def _model(family: str, channels: int = 1) -> Autoregressive:
    torch.manual_seed(0)
    if family == "igpt":
        net = IGPT(size="tiny", image_size=8, in_chans=channels, colours=6)
    else:
        net = LSTM(image_size=8, patch_size=1, in_chans=channels, hidden=16, layers=1, causal=True, colours=6)
    model = Autoregressive(net)
    x = model.to_input(_images(40, channels))
    net.palette.fit(x.permute(0, 2, 3, 1).reshape(-1, channels))
    return model


def _in_palette(pixels: torch.Tensor, colours: torch.Tensor) -> bool:
    """Every ``(P, C)`` pixel is exactly one of the ``(K, C)`` colours."""
    return bool((pixels[:, None] == colours[None]).all(-1).any(1).all())


@pytest.mark.parametrize("family,channels", [("igpt", 1), ("lstm", 3)])
def test_completions_keep_the_quantised_upper_half(family, channels):
    model = _model(family, channels)
    images = _images(3, channels)
    x, quantised, done = completions.complete(model, images, k=2)
    assert done.shape == (3, 2, channels, 8, 8)
    net = model.backbone
    # the given half, exactly: the palette colours of the input's upper 4 rows
    expected = net.palette.colours[net.palette.quantise(x)].transpose(1, 2).reshape(3, channels, 8, 8)
    for j in range(2):
        assert torch.equal(done[:, j, :, :4], expected[:, :, :4])
    assert torch.equal(quantised, expected)
    # completed rows are palette colours too; differing draws give differing lower halves
    pix = done.permute(0, 1, 3, 4, 2).reshape(-1, channels)
    assert _in_palette(pix, net.palette.colours)
    assert not torch.equal(done[:, 0, :, 4:], done[:, 1, :, 4:])


def test_samples_are_palette_colours_and_seeded():
    model = _model("igpt")
    drawn = completions.samples(model, n=5)
    assert drawn.shape == (5, 1, 8, 8)
    colours = model.backbone.palette.colours
    assert _in_palette(drawn.permute(0, 2, 3, 1).reshape(-1, 1), colours)
    assert torch.equal(drawn, completions.samples(model, n=5))


def test_make_writes_png_and_skips_other_objectives(tmp_path):
    model = _model("lstm")
    path = completions.make(model, _images(6), torch.full((6,), -1), tmp_path)
    assert path == tmp_path / "completions.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sup = Supervised(IGPT(size="tiny", image_size=8, in_chans=1, colours=6), num_classes=3)
    assert completions.make(sup, _images(3), torch.tensor([0, 1, 2]), tmp_path / "s") is None
