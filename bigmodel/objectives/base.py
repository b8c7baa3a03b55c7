"""The objective interface (DESIGN.md §2, STYLE.md 4-5).

An objective is an ``nn.Module`` that owns the backbone it trains and its own heads (classifier,
projector, decoder), declares the backbone capabilities it needs, turns a uint8 batch into the
views it trains on, and maps views to ``{"loss": ..., **scalars}``. The trainer calls only
:meth:`Objective.views`, :meth:`Objective.forward` and, after every optimizer step,
:meth:`Objective.after_step` (where an EMA teacher updates), and the optimizer is built once from
:meth:`Objective.lr_scales`, so it never special-cases an objective.

Auxiliary losses of the backbone (mixture-of-experts load balancing, see
:meth:`Backbone.aux_loss`) are added here for every objective: hooks around ``forward`` record them
during the call and add their sum to ``loss`` (reported as ``aux_loss``). Their weight belongs to
the module that defines them (e.g. ``architecture.moe.aux_weight``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from bigmodel.architectures.base import Backbone
from bigmodel.data.base import ImageDataset
from bigmodel.data.transforms import to_input


class Objective(nn.Module):
    requires: ClassVar[frozenset[str]] = frozenset()  # backbone capabilities, see architectures.base
    needs_labels: ClassVar[bool] = False

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.register_forward_pre_hook(_start_aux_loss)
        self.register_forward_hook(_add_aux_loss)

    def setup(self, dataset: ImageDataset) -> None:
        """Fit data-dependent state before training (e.g. a colour palette); default: nothing."""

    def to_input(self, images: torch.Tensor) -> torch.Tensor:
        return to_input(images, self.backbone.image_size, self.backbone.in_chans)

    def views(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        """uint8 ``(B, C, H, W)`` → the list of float views this objective trains on."""
        return [self.to_input(images)]

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def lr_scales(self) -> dict[str, float]:
        """``{parameter-name prefix: factor}``: parameters whose name starts with a prefix train at
        the scheduled learning rate times its factor (their own optimizer group, with ``lr_scale``;
        e.g. BYOL's predictor); default: none, every parameter at the scheduled rate."""
        return {}

    def after_step(self, step: int) -> None:
        """Called by the trainer after optimizer step ``step`` (0-based) has updated the weights, on
        every rank, before any checkpoint of that step is written; default: nothing. An EMA teacher
        (BYOL, DINO) updates here, so its state is part of the checkpoint of the same step."""


def _start_aux_loss(objective: Objective, args: Any) -> None:
    objective.backbone.record_aux_loss(True)


def _add_aux_loss(objective: Objective, args: Any, out: Any) -> Any:
    aux = objective.backbone.aux_loss()
    objective.backbone.record_aux_loss(False)
    if isinstance(aux, torch.Tensor) and isinstance(out, dict) and "loss" in out:
        out = {**out, "loss": out["loss"] + aux, "aux_loss": aux.detach()}
    return out
