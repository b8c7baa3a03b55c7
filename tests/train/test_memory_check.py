"""The memory check before the first step (build.check_memory): the batch's views, the model's training
state and the activations of one micro-batch, measured from autograd's saved tensors, against the
free memory; a batch that does not fit is refused with its numbers before anything is written."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from bigmodel.recipe import RecipeError, resolve
from bigmodel.train import build


class Wide(nn.Module):
    """uint8 (B, 1, 8, 8) → 64 pixels → 1000 ReLU units → 10 logits, with BatchNorm (its running
    statistics must survive the measurement)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden, self.norm, self.out = nn.Linear(64, 1000), nn.BatchNorm1d(10), nn.Linear(1000, 10)

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        return [images.float().flatten(1) / 255]

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": F.cross_entropy(self.norm(self.out(F.relu(self.hidden(views[0])))), labels)}


def _recipe(batch_size: int = 64, accum_steps: int = 1, checkpointing: bool = False) -> SimpleNamespace:
    return SimpleNamespace(optim=SimpleNamespace(batch_size=batch_size, accum_steps=accum_steps),
                           run=SimpleNamespace(precision="fp32", activation_checkpointing=checkpointing))


DATA = SimpleNamespace(channels=1, image_size=8)


def test_activation_memory_is_what_the_forward_saves_for_backward_per_image():
    """Two images: the hidden layer's ReLU output (saved by ReLU and by the output layer: one storage,
    2·1000·4 bytes) and BatchNorm's input (the logits, 2·10·4), its batch mean and inverse std (2·10·4),
    cross-entropy's log-softmax (2·10·4), the labels (2·8) and nll's total weight (4): 8,260 bytes,
    4,130 per image. The weights and the views are counted apart, the BatchNorm statistics restored."""
    model = Wide()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert build.activation_memory(_recipe(), DATA, model) == 4130
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert build.activation_memory(_recipe(checkpointing=True), DATA, model) == 0


def test_a_batch_whose_activations_do_not_fit_is_refused_with_the_numbers(monkeypatch):
    model = Wide()
    state = 64 * 64 * 4 + 16 * sum(p.numel() for p in model.parameters())
    assert build.batch_memory(_recipe(), DATA, model) == state
    free = state + 64 * 4130 - 1  # the state fits, its activations do not
    monkeypatch.setattr(build, "available_memory", lambda dev: free)
    with pytest.raises(ValueError) as e:
        build.check_memory(_recipe(), DATA, model)
    where = build.device(_recipe().run).type  # cpu, or cuda on a GPU machine
    assert str(e.value) == (
        f"optim.batch_size = 64 needs at least {(state + 64 * 4130) / 2**30:.1f} GiB per process: "
        f"{state / 2**30:.1f} GiB for the batch's views and the model's weights, gradients and optimizer state, "
        f"and {64 * 4130 / 2**30:.1f} GiB of activations (64 images per forward pass × {4130 / 2**20:.1f} MiB), "
        f"more than the {free / 2**30:.1f} GiB free on {where}; raise optim.accum_steps, lower optim.batch_size or "
        f"set run.activation_checkpointing=true")
    build.check_memory(_recipe(accum_steps=2), DATA, model)  # 32 images per pass: fits


def test_run_refuses_before_writing_when_the_activations_do_not_fit(tmp_path, monkeypatch):
    """``bigmodel run``: the check runs while building, before run.out exists."""
    from bigmodel import api

    recipe = resolve("fractals-vit", ["run.tiny=true", f"run.out={tmp_path / 'r'}"])
    data, model = build.experiment(recipe)
    state = build.batch_memory(recipe, data, model)
    monkeypatch.setattr(build, "available_memory", lambda dev: state + 1)
    with pytest.raises(RecipeError, match=r"^optim.batch_size = 32 needs at least .* of activations \(32 images per "
                                          r"forward pass × "):
        api.run_pipeline(recipe, Console(quiet=True))
    assert not (tmp_path / "r").exists()
