"""Fixtures of the transfer tests: a tiny pretrained checkpoint, and a tiny MLP backbone that learns
in a few SGD steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bigmodel.architectures.base import Backbone


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run directory of ``bigmodel run quickstart run.tiny=true`` at 16² pixels, with a one-line
    transfer section (kNN on digits) so that the run's report.json carries transfer provenance; no
    figures (no test here looks at them)."""
    from bigmodel import api
    from bigmodel.recipe import resolve

    out = tmp_path_factory.mktemp("transfer") / "qs"
    recipe = resolve("fractals-vit", ["run.tiny=true", f"run.out={out}", "architecture.image_size=16",
                                    "data.image_size=16", "transfer=[{task: digits, protocol: knn, k: 5}]",
                                    "run.figures=false"])
    api.run_pipeline(recipe)
    return out


class TinyMLP(Backbone):
    """8×8 grey images → 32 ReLU features."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.feature_dim, self.in_chans, self.image_size = 32, 1, 8
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU())

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features


@pytest.fixture
def tiny_mlp():
    return TinyMLP
