"""FLOPs of a backbone's forward pass and of a real training step (report.json's compute figures).

Counted by PyTorch's :class:`~torch.utils.flop_counter.FlopCounterMode`, whose convention this
keeps: a FLOP is half a multiply-accumulate of a matrix product or convolution (``2·m·n·k`` for an
``(m, k) @ (k, n)`` product); biases, norms, activations, softmax and other elementwise work are
not counted. FlopCounterMode has no formula for two kernels the backbones run, added here:

- the CPU kernel of ``scaled_dot_product_attention`` (forward and backward): PyTorch's own
  formula for its GPU kernels, ``QKᵀ`` and ``AV`` (``4·B·H·S²·d`` forward), causal masks counted in
  full as PyTorch does;
- recurrent layers (``mkldnn_rnn_layer`` on CPU, ``_cudnn_rnn`` on GPU): per layer and direction,
  ``2·B·T·(|W_ih| + |W_hh|)`` forward, which for an LSTM (4 gates) of input width ``i`` and hidden
  width ``h`` is ``2·4·(i·h + h·h)·T`` per sequence; backward twice that (input and weight
  gradients).

What is counted is what runs: a V-MoE layer in evaluation runs each token through its ``top_k``
experts; in training it runs every expert on its fixed-size capacity buffer, as V-MoE does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from bigmodel.architectures.base import Backbone
from bigmodel.data.loader import batches

aten = torch.ops.aten


def _sdpa_cpu(query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _sdpa_cpu_backward(grad_out, query, key, value, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _rnn_matmuls(input_shape: torch.Size, weights: list[torch.Size]) -> int:
    """``2·(B·T)·Σ|W|`` over the 2-D (input-to-hidden and hidden-to-hidden) weights of one call."""
    steps = 1
    for n in input_shape[:-1]:
        steps *= n
    return 2 * steps * sum(w[0] * w[1] for w in weights if len(w) == 2)


def _mkldnn_rnn_layer(input, w_ih, w_hh, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _rnn_matmuls(input, [w_ih, w_hh])


def _mkldnn_rnn_layer_backward(input, w_ih, w_hh, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * _rnn_matmuls(input, [w_ih, w_hh])


def _cudnn_rnn(input, weights, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _rnn_matmuls(input, list(weights))


def _cudnn_rnn_backward(input, weights, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * _rnn_matmuls(input, list(weights))


MISSING_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
    aten.mkldnn_rnn_layer: _mkldnn_rnn_layer,
    aten.mkldnn_rnn_layer_backward: _mkldnn_rnn_layer_backward,
    aten._cudnn_rnn: _cudnn_rnn,
    aten._cudnn_rnn_backward: _cudnn_rnn_backward,
}


def counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the kernels listed in the module docstring."""
    return FlopCounterMode(display=False, custom_mapping=MISSING_FORMULAS)


def forward_flops(backbone: Backbone) -> int:
    """FLOPs of one image through every layer of the backbone (:meth:`Backbone.forward_full`), in
    evaluation mode; e.g. all of iGPT's blocks, not only those its pooled features read."""
    dev = next(backbone.parameters()).device
    x = torch.zeros(1, backbone.in_chans, backbone.image_size, backbone.image_size, device=dev)
    was_training = backbone.training
    backbone.eval()
    try:
        with counter() as count, torch.no_grad():
            backbone.forward_full(x)
    finally:
        backbone.train(was_training)
    return count.get_total_flops()


def train_step_flops(objective: torch.nn.Module, views: list[torch.Tensor], labels: torch.Tensor,
                     accum_steps: int = 1) -> int:
    """FLOPs of one training step: the objective's forward on ``views`` (every view it trains on,
    e.g. SimCLR's two; MAE's encoder on the visible tokens and its decoder) and the backward, in
    ``accum_steps`` micro-batches as the trainer runs them. The optimizer update is not counted.

    Runs on a copy (:func:`_scratch_copy`), one micro-batch at a time moved to the objective's
    device, with the RNG state restored: the objective's weights, gradients and buffers (BatchNorm's
    running statistics, which a training-mode forward updates) stay exactly as they were, so what
    is scored afterwards is what its checkpoint holds.
    """
    scratch = _scratch_copy(objective).train()
    dev = next(objective.parameters()).device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), counter() as count:
        chunks = zip(*(v.chunk(accum_steps) for v in views), labels.chunk(accum_steps), strict=True)
        for *micro, y in chunks:
            scratch([m.to(dev) for m in micro], y.to(dev))["loss"].backward()
    return count.get_total_flops()


def _scratch_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` whose parameters are new ``Parameter`` objects over the same storage
    (no memory for the weights; gradients land on the copy's) and whose buffers and other state
    are copies: nothing run on it reaches ``module``."""
    memo: dict[int, Any] = {id(p): torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
                            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def summary(objective: torch.nn.Module, views: list[torch.Tensor], labels: torch.Tensor,
            accum_steps: int = 1) -> dict[str, Any]:
    """report.json's compute figures: forward GFLOPs per image of the backbone and training GFLOPs
    per step (forward + backward of the objective on one batch of ``len(labels)`` images)."""
    return {"forward_gflops_per_image": round(forward_flops(objective.backbone) / 1e9, 6),
            "train_gflops_per_step": round(train_step_flops(objective, views, labels, accum_steps) / 1e9, 4),
            "train_images_per_step": len(labels)}


def for_run(recipe: Any, data: Any, objective: torch.nn.Module, world: int = 1) -> dict[str, Any]:
    """:func:`summary` on the run's first training batch, made as the trainer makes it (same
    sampler, seed and views). The views stay in host memory and the count runs one micro-batch at
    a time on the objective's device: the batch is cut into ``accum_steps · world`` micro-batches,
    the pieces the ``world`` processes of a torchrun launch ran, so one process counts the global
    step without holding more than one rank's micro-batch. (A contrastive loss that gathers
    across ranks is counted on each piece alone: its similarity matrix is the local one.)"""
    cfg, seed = recipe.optim, recipe.run.seed
    images, labels = next(batches(data, cfg.batch_size, seed, 0, 1))
    views = objective.views(images, torch.Generator().manual_seed(seed * 1_000_003))
    return summary(objective, views, labels, getattr(cfg, "accum_steps", 1) * world)
