"""The one loader (STYLE.md 20): a run directory or a checkpoint folder → the model it holds, with
its recipe, classes, meta and test view, rebuilt from the checkpoint alone (no training data).

Two kinds of checkpoint exist, each as one safetensors file or as a sharded DCP folder (read
through :mod:`bigmodel.train.checkpoint`'s public functions, so both kinds load the same way):

- a pretraining checkpoint (``meta.json`` holds the resolved ``recipe``): the objective with its
  heads, the class head of a ``supervised`` run included;
- a fine-tune checkpoint (``meta.json`` holds ``finetune``, kept by ``--protocol finetune --set
  checkpoint_dir=DIR``): the fine-tuned :class:`~bigmodel.objectives.classifier.Classifier`, its
  backbone rebuilt from the recorded ``architecture`` section.

Every command (transfer, ensemble, analyze, report, figures, export, predict) and the Python API
(``bigmodel.load``) call :func:`load`. The loader sits between the engine and the protocols: the
fine-tuned classifier it rebuilds is an objective (:mod:`bigmodel.objectives.classifier`, with the
schedule that sets its test view), so the loader imports nothing from ``transfer/``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from bigmodel.architectures.base import Backbone
from bigmodel.data.transforms import to_input
from bigmodel.errors import CheckpointError, RecipeError
from bigmodel.objectives.base import Objective
from bigmodel.objectives.classifier import Classifier, Schedule
from bigmodel.recipe import Component, Recipe, RunConfig, validate
from bigmodel.registry import ARCHITECTURES, OBJECTIVES
from bigmodel.train import build, checkpoint

FINETUNE = "finetune"  # ``Pretrained.kind`` of a fine-tuned classifier


@dataclasses.dataclass
class Pretrained:
    """A checkpoint rebuilt by :func:`load` (``bigmodel.load``), in eval mode.

    Attributes:
        objective: the model the checkpoint holds: the pretraining objective with its heads (the
            class head of a supervised run), or the fine-tuned
            :class:`~bigmodel.objectives.classifier.Classifier`; its backbone is :attr:`backbone`.
        checkpoint: the checkpoint folder (a run directory's latest intact one); ``step`` its step.
        meta: its ``meta.json``.
        recipe: the resolved recipe of a pretraining run; ``None`` for a fine-tune, which has none.
        architecture: the recipe section that builds the backbone (``{name, **kwargs}``).
        kind: the pretraining objective's name, or ``"finetune"``.
        classes: the training data's class names as the checkpoint recorded them (empty where the
            data named none, e.g. unlabelled).
        labels: the names of the class head's outputs, in order (``[]`` without a class head); the
            label index as a string where the data named no classes.
    """

    objective: Objective
    checkpoint: Path
    step: int
    meta: dict[str, Any]
    recipe: Recipe | None
    architecture: dict[str, Any]
    kind: str
    classes: list[str]
    labels: list[str]

    @property
    def backbone(self) -> Backbone:
        return self.objective.backbone

    @property
    def head(self) -> nn.Linear | None:
        """The class head (``feature_dim → len(labels)``), or ``None`` for a checkpoint without one."""
        return self.objective.head if self.labels else None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images ``(B, C, H, W)`` or one ``(C, H, W)`` → the float batch the model was
        evaluated on, on its device: :func:`~bigmodel.data.transforms.to_input` at the backbone's
        size (resized, channels matched, normalised; what the transfer protocols feed it), or a
        fine-tuned classifier's own test view (the centre crop of the image resized as in training)."""
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() not in (3, 4):
            raise TypeError("preprocess takes a uint8 tensor (B, C, H, W) or (C, H, W)")
        batch = images if images.dim() == 4 else images[None]
        if self.kind == FINETUNE:
            return self.objective.test_input(batch).to(self.device)
        return to_input(batch, self.backbone.image_size, self.backbone.in_chans).to(self.device)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, feature_dim)`` of uint8 images (float32, no autocast, no grad)."""
        with torch.no_grad():  # not inference_mode: the features may feed a head trained afterwards
            return self.backbone(self.preprocess(images))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed images ``(B, C, S, S)`` → class logits ``(B, len(labels))``."""
        if self.head is None:
            raise CheckpointError(f"{self.checkpoint}: a {self.kind} checkpoint has no class head")
        return self.head(self.backbone(x))


def find(source: str | Path) -> Path:
    """The checkpoint folder of ``source``: itself, or a run directory's latest intact checkpoint.

    Raises:
        CheckpointError: no such folder, no checkpoint in it, or none intact.
    """
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{source}: no such run directory or checkpoint folder")
    found = checkpoint.latest(path)
    if found is None:
        raise CheckpointError(f"{source}: no complete checkpoint (expected a run directory or checkpoints/step_*)")
    return found


def load(source: str | Path, device: str | torch.device | None = None) -> Pretrained:
    """``bigmodel.load``: the model of a run directory (its latest intact checkpoint) or of one
    checkpoint folder, rebuilt from its ``meta.json`` alone, weights loaded, in eval mode.

    Args:
        device: where to put it (default: the run's device, :func:`bigmodel.train.build.device`).

    Raises:
        CheckpointError: no intact checkpoint there, a meta.json that rebuilds nothing, or weights
            that do not fit the model it describes.
    """
    found = find(source)
    try:
        meta = checkpoint.load_meta(found)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{found}: meta.json is unreadable ({type(e).__name__})") from None
    if "recipe" in meta:
        loaded = _pretraining(found, meta)
    elif FINETUNE in meta:
        loaded = _finetuned(found, meta)
    else:
        raise CheckpointError(f"{found}: meta.json holds neither a recipe (pretraining) nor a fine-tune schedule; "
                              f"is it a bigmodel checkpoint?")
    dev = device if device is not None else build.device(loaded.recipe.run if loaded.recipe else RunConfig())
    loaded.objective.to(dev).eval()
    return loaded


def _pretraining(found: Path, meta: dict[str, Any]) -> Pretrained:
    """The objective of a pretraining checkpoint, its heads sized from ``num_classes``."""
    try:
        recipe = validate(meta["recipe"])
    except RecipeError as e:
        raise CheckpointError(f"{found}: its recipe no longer validates: {e}") from None
    cls = OBJECTIVES.get(recipe.objective.name)
    num_classes = _num_classes(found, meta, required=False)
    model = build.objective_for(recipe, build.backbone(recipe.architecture), num_classes)
    checkpoint.load_weights(found, model)
    head = getattr(model, "head", None)
    labelled = cls.needs_labels and isinstance(head, nn.Linear)
    return Pretrained(model, found, meta.get("step", 0), meta, recipe, dict(recipe.raw["architecture"]),
                      recipe.objective.name, [str(c) for c in meta.get("classes") or []],
                      _names(meta, head.out_features) if labelled else [])


def _finetuned(found: Path, meta: dict[str, Any]) -> Pretrained:
    """A fine-tuned classifier: the backbone from the recorded architecture section, the head from
    ``num_classes``, the test view from the schedule."""
    section = meta.get("architecture")
    if not section:
        raise CheckpointError(
            f"{found}: this fine-tune checkpoint does not record the architecture of its backbone (meta.json has "
            f"no 'architecture': the fine-tuned backbone did not carry its recipe section), so it cannot be rebuilt")
    net = build.backbone(_architecture(found, section))
    ft = meta[FINETUNE]
    schedule = Schedule(**{**ft["schedule"], "decay_steps": tuple(ft["schedule"]["decay_steps"])})
    num_classes = _num_classes(found, meta, required=True)
    model = Classifier(net, num_classes, schedule, flip=ft.get("flip", False), test_crop=ft.get("test_crop", True),
                       generative_weight=ft.get("generative_weight", 0.0))
    checkpoint.load_weights(found, model)
    return Pretrained(model, found, meta.get("step", 0), meta, None, dict(section), FINETUNE,
                      [str(c) for c in meta.get("classes") or []], _names(meta, num_classes))


def _architecture(found: Path, section: dict[str, Any]) -> Component:
    """A recorded ``{name, **kwargs}`` architecture section, validated against its builder."""
    name = section.get("name")
    if name not in ARCHITECTURES:
        raise CheckpointError(f"{found}: meta.json names architecture {name!r}; "
                              f"valid: {', '.join(ARCHITECTURES.names())}")
    try:
        kwargs = ARCHITECTURES.validate(name, {k: v for k, v in section.items() if k != "name"})
    except ValidationError as e:
        raise CheckpointError(f"{found}: meta.json's architecture section does not validate: "
                              f"{str(e).splitlines()[0]}") from None
    return Component(name=name, kwargs=kwargs)


def _num_classes(found: Path, meta: dict[str, Any], required: bool) -> int:
    """The class head's outputs: ``num_classes`` in meta, else (checkpoints saved before meta
    recorded it) the rows of the saved ``head.weight``; 0 without one unless ``required``."""
    if meta.get("num_classes") is not None:
        return int(meta["num_classes"])
    weight = checkpoint.read_weights(found, "head.").get("weight")
    if weight is None:
        if required:
            raise CheckpointError(f"{found}: no 'num_classes' in meta.json and no head.weight in the weights")
        return 0
    return weight.shape[0]


def _names(meta: dict[str, Any], n: int) -> list[str]:
    """The training data's class names when meta records all ``n``, else the label indices."""
    names = [str(c) for c in meta.get("classes") or []]
    return names if len(names) == n else [str(i) for i in range(n)]


def run_dir_of(ckpt_folder: Path) -> Path:
    """The run directory holding a checkpoint folder (``RUN/checkpoints/step_*``)."""
    ckpt_folder = Path(ckpt_folder)
    return ckpt_folder.parent.parent if ckpt_folder.parent.name == "checkpoints" else ckpt_folder.parent


def load_backbone(source: str | Path) -> tuple[Backbone, Path, Recipe]:
    """The pretrained backbone of a pretraining checkpoint (a run directory or a checkpoint
    folder), on the run's device, in eval mode; returns ``(backbone, checkpoint folder, recipe)``.

    Raises:
        CheckpointError: as :func:`load`, or a fine-tune checkpoint (it has no recipe to score
            with; give the run directory it was fine-tuned from).
    """
    m = pretraining(source)
    return m.backbone, m.checkpoint, m.recipe


def pretraining(source: str | Path) -> Pretrained:
    """:func:`load` for commands that need a pretraining run (its recipe): a fine-tune is refused."""
    m = load(source)
    if m.recipe is None:
        raise CheckpointError(f"{m.checkpoint}: a fine-tune checkpoint has no pretraining recipe; give the run "
                              f"directory it was fine-tuned from (bigmodel predict and export take it as it is)")
    return m
