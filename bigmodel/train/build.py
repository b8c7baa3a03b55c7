"""Recipe → objects. The entry points build; the engine (trainer, protocols) runs."""

from __future__ import annotations

import torch

import bigmodel.components  # noqa: F401  (fills the registries)
from bigmodel.architectures.base import Backbone
from bigmodel.data.base import ImageDataset
from bigmodel.data.loader import batches  # noqa: F401  (re-exported for the trainer)
from bigmodel.objectives.base import Objective
from bigmodel.recipe import Component, OptimConfig, Recipe, RunConfig
from bigmodel.registry import ARCHITECTURES, DATASETS, OBJECTIVES


def dataset(spec: Component, split: str) -> ImageDataset:
    return DATASETS.build(spec.name, split=split, **spec.kwargs)


def backbone(spec: Component) -> Backbone:
    return ARCHITECTURES.build(spec.name, **spec.kwargs)


def objective(recipe: Recipe, net: Backbone, data: ImageDataset) -> Objective:
    cls = OBJECTIVES.get(recipe.objective.name)
    if cls.needs_labels and data.num_classes < 2:
        raise ValueError(f"objective {recipe.objective.name!r} needs labelled data; "
                         f"data {recipe.data.name!r} has no labels")
    return cls(backbone=net, num_classes=data.num_classes, **recipe.objective.kwargs)


def optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD; no weight decay on biases, norms, tokens and position embeddings (1-D or
    named ``*_token``/``pos_embed``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token", "start_token"))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=False)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, foreach=True)


def device(run: RunConfig) -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(run: RunConfig, dev: torch.device) -> torch.dtype | None:
    """bf16 autocast when asked, or under ``auto`` where the hardware has fast bf16 matmuls
    (CUDA with bf16 support, or a CPU with AMX); ``None`` means plain fp32."""
    if run.precision == "bf16":
        return torch.bfloat16
    if run.precision == "auto":
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if dev.type == "cpu" and "AMX" in torch.backends.cpu.get_cpu_capability().upper():
            return torch.bfloat16
    return None


def experiment(recipe: Recipe) -> tuple[ImageDataset, Objective]:
    """The training set and the objective (with its backbone) of a recipe, initialised from
    ``run.seed``. Raises ValueError/FileNotFoundError for problems only building reveals."""
    data = dataset(recipe.data, "train")
    torch.manual_seed(recipe.run.seed)
    net = backbone(recipe.architecture)
    return data, objective(recipe, net, data)


def random_twin(recipe: Recipe, data: ImageDataset | None = None) -> Backbone:
    """The backbone exactly as pretraining started it: same recipe, same seed, no training.

    With ``data`` (the pretraining set), the objective's ``setup`` runs on it too, so that
    data-dependent state fitted before training (e.g. ImageGPT's colour palette) is the same.
    """
    torch.manual_seed(recipe.run.seed)
    net = backbone(recipe.architecture)
    if data is not None:
        objective(recipe, net, data).setup(data)
    return net
