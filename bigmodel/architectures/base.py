"""The backbone interface every architecture implements (DESIGN.md §2).

A backbone maps images ``(B, in_chans, image_size, image_size)`` (float, normalised by
:func:`bigmodel.data.transforms.to_input`) to features. Heads and losses live in objectives and
transfer protocols, never here, so any backbone composes with any compatible objective.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from timm.layers import DropPath
from torch import nn

from bigmodel.errors import ExportError

# Capabilities an objective may require (see Objective.requires).
# TOKENS: patch tokens with a token-dropping path (needed by MAE): ``patch_size``, ``num_patches``
# and ``forward_visible(x, ids_keep) -> (B, 1 + K, D)``, see ViT.
TOKENS = "tokens"
# CAUSAL: a causal model of pixel-token sequences (needed by next-pixel prediction): the
# SequenceModel interface of bigmodel.architectures.sequence.
CAUSAL = "causal"


class Backbone(nn.Module):
    """Base class. Subclasses set ``feature_dim``, ``in_chans``, ``image_size``, and ``family``
    (which fine-tuning defaults suit them: see :data:`bigmodel.transfer.finetune.FAMILY_DEFAULTS`)."""

    provides: ClassVar[frozenset[str]] = frozenset()
    family: str = "convnet"  # "convnet", "transformer" or "recurrent"
    feature_dim: int
    in_chans: int
    image_size: int

    @classmethod
    def capabilities(cls, **cfg: Any) -> set[str]:
        """Capabilities of the backbone a recipe section would build (before building it)."""
        return set(cls.provides)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens ``(B, N, D)`` or a feature map ``(B, C, H, W)``."""
        raise NotImplementedError

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """``(B, feature_dim)`` from :meth:`forward_features`'s output."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def block_features(self, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Pooled features after each block, shallow to deep: ``[(name, (B, D_i)), ...]``.

        Each block's output is pooled as :meth:`pool` pools the final features (for transformers
        and the LSTM after the backbone's final norm), so the last entry equals ``self(x)``
        (except where the pooled features stop early: iGPT's ``feature_layer``; see there). The
        layer-wise probe and CKA of :mod:`bigmodel.analysis` read this and nothing else. This
        default has one entry, the pooled features, for a backbone without intermediate outputs.
        """
        return [("output", self(x))]

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """Every layer of the network on images ``(B, C, H, W)``: the computation its FLOPs
        describe. The pooled features by default; a backbone whose features stop early (iGPT's
        ``feature_layer``) runs the rest too."""
        return self(x)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any] | None:
        """timm's layer grouping (``VisionTransformer.group_matcher``): regexes over parameter names,
        ``stem`` (embeddings, layer 0) and ``blocks`` (one layer per block; the final norm last), read
        by ``timm.optim.param_groups_layer_decay`` for layer-wise lr decay. ``None``: no layers."""
        return None

    def no_weight_decay(self) -> set[str]:
        """Names of parameters fine-tuning never decays (position embeddings, class tokens); 1-D
        parameters (biases, norms) are never decayed either."""
        return set()

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth over the residual blocks (timm's ``Block``: ``drop_path1``/``drop_path2``),
        rising linearly from 0 at the first block to ``rate`` at the last, as timm builds it.

        Raises:
            ValueError: ``rate > 0`` and the backbone has no such blocks.
        """
        blocks = [m for m in self.modules() if hasattr(m, "drop_path1") and hasattr(m, "drop_path2")]
        if rate > 0 and not blocks:
            raise ValueError(f"drop_path={rate}: {type(self).__name__} has no transformer blocks to drop")
        for i, block in enumerate(blocks):
            r = rate * i / max(1, len(blocks) - 1)
            block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
            block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # Auxiliary losses (e.g. the load-balancing loss of mixture-of-experts layers). A submodule that
    # has one subclasses AuxLossSource; while recording is on (an objective's forward turns it on,
    # see Objective), it keeps one term per forward pass, so an objective that runs the backbone on
    # several views collects all of them. Recording is off otherwise: inference and feature
    # extraction keep no graph alive.

    def _aux_sources(self) -> Iterator[AuxLossSource]:
        return (m for m in self.modules() if isinstance(m, AuxLossSource))

    def record_aux_loss(self, on: bool) -> None:
        """Clear recorded auxiliary losses and turn recording on or off."""
        for m in self._aux_sources():
            m.aux_terms.clear()
            m.recording = on

    def aux_loss(self) -> torch.Tensor | float:
        """Sum of the auxiliary losses recorded since recording was turned on (already weighted
        by their module), a scalar tensor; ``0.0`` when the backbone has none."""
        terms = [t for m in self._aux_sources() for t in m.aux_terms]
        return torch.stack(terms).sum() if terms else 0.0


class AuxLossSource(nn.Module):
    """A module that adds an auxiliary loss term per forward pass while ``recording``."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = False
        self.aux_terms: list[torch.Tensor] = []

    def record(self, loss: torch.Tensor) -> None:
        if self.recording:
            self.aux_terms.append(loss.float())


# Export to timm (timm's ``checkpoint_filter_fn`` pattern): each architecture module that has a timm
# counterpart defines ``to_timm(backbone, section) -> TimmSpec`` beside the architecture, and refuses
# with :func:`no_timm` what timm cannot express. ``bigmodel.export.timm`` calls them.

TIMM_INSTEAD = "use --format onnx or safetensors"


@dataclasses.dataclass
class TimmSpec:
    """A timm model that holds a backbone: ``timm.create_model(name, pretrained=False, **kwargs)``
    then ``load_state_dict(state_dict)`` computes the backbone's pooled features as
    ``forward_head(forward_features(x), pre_logits=True)``; ``notes`` say what differs in form (not
    in outputs)."""

    name: str
    kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    notes: dict[str, str] = dataclasses.field(default_factory=dict)


def no_timm(why: str) -> ExportError:
    """The one-line refusal of a timm export: ``why`` names the setting and the reason."""
    return ExportError(f"export --format timm: {why}")
