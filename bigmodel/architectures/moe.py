"""Sparse mixture-of-experts MLPs for the ViT (V-MoE: Riquelme et al., 2021, arXiv:2106.05974).

Every ``moe.every``-th transformer block replaces its dense MLP by ``moe.experts`` MLPs (timm's
``Mlp``) and a linear router. Each token goes to its ``moe.top_k`` highest-probability experts,
weighted by the router's softmax probability (not renormalised over the chosen k, as in V-MoE).
An expert takes at most ``capacity = ceil(capacity_factor · k · S / E)`` of the ``S`` tokens of a
batch; choices are served in order of rank (every token's first choice before any second
choice, then in token order), and a choice over capacity is dropped: if all of a token's choices
are dropped the MoE adds nothing and the token passes through the block's residual connection.

Capacity applies in training only. In evaluation (``module.eval()``) no choice is dropped: every
token is served by all of its ``top_k`` experts, so an image's features do not depend on the other
images of its batch (with a batch-wide capacity they did, by ~1% at random init), and each
expert runs on exactly the tokens that chose it (one host sync per layer, for the split sizes).

Load balancing: the auxiliary loss of the Switch Transformer (Fedus et al., 2022),
``E · Σ_e f_e · P_e`` with ``f_e`` the fraction of routing choices that picked expert ``e`` and
``P_e`` its mean router probability — a differentiable stand-in for V-MoE's importance and load
losses; it is 1 for a perfectly balanced router and grows with imbalance. It is multiplied by
``moe.aux_weight`` and reported through :meth:`Backbone.aux_loss`.
"""

from __future__ import annotations

import math
from typing import Annotated, NamedTuple

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from timm.layers import Mlp
from torch import nn

from bigmodel.architectures.base import AuxLossSource


class MoEConfig(BaseModel):
    """The ``architecture.moe`` recipe section (absent = a dense model)."""

    model_config = ConfigDict(extra="forbid")

    experts: Annotated[int, Field(ge=2)] = 8
    top_k: Annotated[int, Field(ge=1)] = 2
    every: Annotated[int, Field(ge=1)] = 2
    capacity_factor: Annotated[float, Field(gt=0)] = 1.0
    aux_weight: Annotated[float, Field(ge=0)] = 0.01

    @model_validator(mode="after")
    def _k_le_e(self) -> MoEConfig:
        if self.top_k > self.experts:
            raise ValueError(f"top_k={self.top_k} exceeds experts={self.experts}")
        return self


class Routing(NamedTuple):
    """How ``S`` tokens are routed: ``expert`` and ``gate`` ``(S, k)`` (rank 0 = first choice),
    ``position`` ``(S, k)`` the place of each choice in its expert's queue, ``kept`` whether that
    is within capacity, ``probs`` ``(S, E)``."""

    expert: torch.Tensor
    gate: torch.Tensor
    kept: torch.Tensor
    position: torch.Tensor
    probs: torch.Tensor
    capacity: int


class MoEMlp(AuxLossSource):
    """Drop-in for a transformer block's MLP: ``(B, N, D) → (B, N, D)``.

    Args:
        dim: token width.
        hidden: hidden width of each expert.
        cfg: experts, top_k, capacity_factor and aux_weight.
    """

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = nn.Linear(dim, cfg.experts, bias=False)
        self.experts = nn.ModuleList(Mlp(dim, hidden) for _ in range(cfg.experts))

    def capacity(self, num_tokens: int) -> int:
        return max(1, math.ceil(self.cfg.capacity_factor * self.cfg.top_k * num_tokens / self.cfg.experts))

    def choose(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The router's probabilities ``(S, E)`` of ``(S, D)`` tokens, and each token's ``top_k``
        gates and experts ``(S, k)``: the routing rule, which every path (and the export) shares."""
        probs = self.router(tokens).float().softmax(-1)
        gate, expert = probs.topk(self.cfg.top_k, dim=-1)
        return probs, gate, expert

    def route(self, tokens: torch.Tensor) -> Routing:
        """Top-k routing of ``(S, D)`` tokens with per-expert capacity."""
        probs, gate, expert = self.choose(tokens)
        cap = self.capacity(len(tokens))
        # Position of each choice in its expert's queue, ranks first then tokens: (k, S) order.
        onehot = F.one_hot(expert.T, self.cfg.experts)  # (k, S, E)
        position = (onehot.flatten(0, 1).cumsum(0) - 1).view_as(onehot)
        position = (position * onehot).sum(-1).T  # (S, k)
        return Routing(expert, gate, position < cap, position, probs, cap)

    def balance_loss(self, r: Routing) -> torch.Tensor:
        """Switch-Transformer load-balancing loss ``E · Σ_e f_e P_e`` (1 when balanced)."""
        e = self.cfg.experts
        f = torch.bincount(r.expert.flatten(), minlength=e).float() / r.expert.numel()
        return e * (f * r.probs.mean(0)).sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training: dispatch into fixed-size expert buffers ``(E · capacity, D)`` and combine back,
        as V-MoE does: shapes never depend on the routing, so there is no host sync. Evaluation:
        every choice is served (:meth:`forward_all_choices`)."""
        tokens = x.reshape(-1, x.shape[-1])
        r = self.route(tokens)
        if self.recording:
            self.record(self.cfg.aux_weight * self.balance_loss(r))
        if not self.training:
            return self.forward_all_choices(tokens, r).view_as(x)
        s, k = r.expert.shape
        e, cap = self.cfg.experts, r.capacity
        # slot of each choice in the buffers; dropped choices go to a spare slot that is never read
        slot = torch.where(r.kept, r.expert * cap + r.position, e * cap).flatten()  # (S·k,)
        source = tokens.repeat_interleave(k, 0)
        buffers = tokens.new_zeros(e * cap + 1, tokens.shape[-1]).index_copy(0, slot, source)
        outputs = [mlp(buffers[i * cap:(i + 1) * cap]) for i, mlp in enumerate(self.experts)]
        outputs = torch.cat([*outputs, buffers[-1:] * 0])  # (E·cap + 1, D)
        weight = (r.gate * r.kept).to(outputs.dtype).view(s, k, 1)
        return (outputs[slot].view(s, k, -1) * weight).sum(1).view_as(x)

    def forward_all_choices(self, tokens: torch.Tensor, r: Routing) -> torch.Tensor:
        """``(S, D)`` tokens → ``(S, D)``, each the gate-weighted sum of its ``top_k`` experts, none
        dropped: the choices are sorted by expert and each expert runs on its own slice."""
        s, k = r.expert.shape
        choice_expert = r.expert.flatten()  # (S·k,), choice j is token j // k
        order = choice_expert.argsort(stable=True)
        counts = torch.bincount(choice_expert, minlength=self.cfg.experts).tolist()  # host sync (eval only)
        chunks = tokens[order // k].split(counts)
        outputs = torch.cat([mlp(chunk) for mlp, chunk in zip(self.experts, chunks, strict=True)])
        outputs = torch.empty_like(outputs).index_copy_(0, order, outputs)  # back to choice order
        return (outputs.view(s, k, -1) * r.gate.to(outputs.dtype)[..., None]).sum(1)


def make_sparse(blocks: nn.Sequential, cfg: MoEConfig) -> list[int]:
    """Replace the MLP of every ``cfg.every``-th timm block (the last of each group of ``every``,
    as V-MoE does) by a :class:`MoEMlp`; returns the indices of the blocks changed."""
    changed = []
    for i, block in enumerate(blocks):
        if (i + 1) % cfg.every == 0:
            dense = block.mlp
            block.mlp = MoEMlp(dense.fc1.in_features, dense.fc1.out_features, cfg)
            changed.append(i)
    return changed


class DenseMoE(nn.Module):
    """A :class:`MoEMlp` in its evaluation form with shapes that do not depend on the routing, for
    graph exporters (ONNX): every expert runs on every token, and each token's output is the
    gate-weighted sum of its ``top_k`` experts (the others weighted 0) — the function of
    :meth:`MoEMlp.forward_all_choices` (no token dropped), which itself splits the tokens by expert
    counts read on the host, something an ONNX graph cannot hold. Costs ``experts / top_k`` times
    the expert compute; shares the router's and experts' weights."""

    def __init__(self, moe: MoEMlp):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, D) → (B, N, D)``."""
        tokens = x.reshape(-1, x.shape[-1])
        probs, gate, expert = self.moe.choose(tokens)  # the MoE's own routing rule
        combine = torch.zeros_like(probs).scatter(-1, expert, gate).to(tokens.dtype)  # (S, E), top_k nonzero
        out = torch.stack([mlp(tokens) for mlp in self.moe.experts], 1)  # (S, E, D)
        return (out * combine[..., None]).sum(1).view_as(x)


def densified(net: nn.Module) -> nn.Module:
    """``net`` with every :class:`MoEMlp` replaced, in place, by its :class:`DenseMoE`."""
    for name, m in list(net.named_modules()):
        if isinstance(m, MoEMlp):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, DenseMoE(m))
    return net
