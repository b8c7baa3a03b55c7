"""Recipe → objects. The entry points build; the engine (trainer, protocols) runs."""

from __future__ import annotations

import os

import torch

from bigmodel.architectures.base import Backbone
from bigmodel.data.base import ImageDataset
from bigmodel.data.loader import batches, rank_world  # noqa: F401  (batches: re-exported for the trainer)
from bigmodel.objectives.base import Objective
from bigmodel.recipe import Component, OptimConfig, Recipe, RunConfig
from bigmodel.registry import ARCHITECTURES, DATASETS, OBJECTIVES
from bigmodel.train import precision


def dataset(spec: Component, split: str) -> ImageDataset:
    return DATASETS.build(spec.name, split=split, **spec.kwargs)


def backbone(spec: Component) -> Backbone:
    """The backbone of a recipe section; it keeps that section as ``architecture`` so that what is
    made from it alone (a fine-tuned classifier's checkpoint, an export) can rebuild it."""
    net = ARCHITECTURES.build(spec.name, **spec.kwargs)
    net.architecture = {"name": spec.name, **spec.kwargs}
    return net


def objective(recipe: Recipe, net: Backbone, data: ImageDataset) -> Objective:
    check_labels(recipe, data)
    return OBJECTIVES.get(recipe.objective.name)(backbone=net, num_classes=data.num_classes, **recipe.objective.kwargs)


def check_labels(recipe: Recipe, data: ImageDataset) -> None:
    """An objective that needs labels gets at least two classes."""
    cls = OBJECTIVES.get(recipe.objective.name)
    if cls.needs_labels and data.num_classes < 2:
        if data.num_classes == 1:
            names = getattr(data, "classes", None)
            raise ValueError(f"objective {recipe.objective.name!r} needs at least 2 classes; data {recipe.data.name!r} "
                             f"has only one{f' ({names[0]!r})' if names else ''}")
        raise ValueError(f"objective {recipe.objective.name!r} needs labelled data; "
                         f"data {recipe.data.name!r} has no labels")


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
    # fused: one kernel over all parameters (ResNet-50's step 34 → 10 ms on 2 CPU threads); FSDP2's
    # sharded DTensor parameters take the foreach path
    from torch.distributed.tensor import DTensor

    fused = all(p.device.type in ("cpu", "cuda") and not isinstance(p, DTensor) for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **({"fused": True} if fused else {"foreach": True}))


def device(run: RunConfig) -> torch.device:
    """This process's device: the GPU named by ``LOCAL_RANK`` (set by torchrun: one process per
    GPU) or the only/current one, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ["LOCAL_RANK"])) if "LOCAL_RANK" in os.environ else torch.device("cuda")


def autocast_dtype(run: RunConfig, dev: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``run.precision`` on ``dev`` (see :mod:`bigmodel.train.precision`)."""
    return precision.autocast_dtype(run.precision, dev)


def experiment(recipe: Recipe) -> tuple[ImageDataset, Objective]:
    """The training set and the objective (with its backbone) of a recipe, initialised from
    ``run.seed``. Raises ValueError/FileNotFoundError for problems only building reveals."""
    data = dataset(recipe.data, "train")
    check_labels(recipe, data)
    check_batch_size(recipe, data)
    torch.manual_seed(recipe.run.seed)
    net = backbone(recipe.architecture)
    model = objective(recipe, net, data)
    check_memory(recipe, data, model)
    return data, model


def check_batch_size(recipe: Recipe, data: ImageDataset) -> None:
    """A batch larger than the training set is a mistake (an epoch would repeat images within one
    batch): refuse it before anything big is built. Streams of unknown length (no ``len``) are
    not checked; ``shards`` know their length from their index."""
    try:
        n = len(data)
    except TypeError:  # a stream of unknown length: nothing to compare against
        return
    b = recipe.optim.batch_size
    if b > n:
        raise ValueError(f"optim.batch_size = {b} is larger than the training set ({n} image{'s' * (n != 1)}); "
                         f"lower optim.batch_size to at most {n}")


def batch_memory(recipe: Recipe, data: ImageDataset, model: Objective) -> int:
    """A lower bound, in bytes, of what one training step holds on each process: the float views
    of its slice of the batch (shapes from ``model.views`` of one blank image), and the weights,
    gradients and two AdamW moments (16 bytes per parameter). Activations come on top and
    depend on the architecture, so they are not counted."""
    blank = torch.zeros(1, data.channels, data.image_size, data.image_size, dtype=torch.uint8)
    with torch.no_grad():
        views = model.views(blank, torch.Generator().manual_seed(0))
    per_image = sum(v[:1].numel() * 4 for v in views)  # fp32 views
    per_rank = -(-recipe.optim.batch_size // rank_world()[1])
    return per_rank * per_image + 16 * sum(p.numel() for p in model.parameters())


def available_memory(dev: torch.device) -> int | None:
    """Free bytes on ``dev``: the GPU's free memory, or the host's ``MemAvailable`` (``/proc/meminfo``,
    else ``os.sysconf``); ``None`` when unknown."""
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(recipe: Recipe, data: ImageDataset, model: Objective) -> None:
    """Refuse a batch whose views and model state alone exceed the free memory, before the first
    step tries to allocate them (see :func:`batch_memory`)."""
    dev = device(recipe.run)
    free = available_memory(dev)
    need = batch_memory(recipe, data, model)
    if free is not None and need > free:
        raise ValueError(f"optim.batch_size = {recipe.optim.batch_size} needs at least {need / 2**30:.1f} GiB "
                         f"(the batch's views and the model's weights, gradients and optimizer state, before "
                         f"activations), more than the {free / 2**30:.1f} GiB free on {dev.type}; lower optim.batch_size")


def random_twin(recipe: Recipe, data: ImageDataset | None = None, pretrained: Backbone | None = None) -> Backbone:
    """The backbone exactly as pretraining started it: same recipe, same seed, no training.

    Data-dependent state fitted before training (ImageGPT's and the causal LSTM's colour palette)
    must be the same too: with ``data`` (the pretraining set) the objective's ``setup`` fits it
    again; with ``pretrained`` (the trained backbone, when the data is absent) it is copied from
    there, since training never changes it.
    """
    torch.manual_seed(recipe.run.seed)
    net = backbone(recipe.architecture)
    if data is not None:
        objective(recipe, net, data).setup(data)
    elif pretrained is not None:
        fitted = {k: v for k, v in pretrained.state_dict().items() if k.startswith("palette.")}
        net.load_state_dict(fitted, strict=False)
    return net
