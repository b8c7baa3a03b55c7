"""Recipe → objects. The entry points build; the engine (trainer, protocols) runs."""

from __future__ import annotations

import inspect
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
    return objective_for(recipe, net, data.num_classes)


def objective_for(recipe: Recipe, net: Backbone, num_classes: int) -> Objective:
    """The recipe's objective around ``net``, given the framework's context: the backbone, the class
    count and, to an objective that declares it, ``total_steps`` (the run length, e.g. the length of
    an EMA momentum schedule). Pretraining and the loader both build through here."""
    cls = OBJECTIVES.get(recipe.objective.name)
    context = {"backbone": net, "num_classes": num_classes, "total_steps": recipe.optim.steps}
    takes = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in context.items() if k in takes}, **recipe.objective.kwargs)


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
    named ``*_token``/``pos_embed``). Parameters an objective scales (:meth:`Objective.lr_scales`)
    get groups of their own, after the two plain ones, carrying ``lr_scale`` for the trainer."""
    scales = model.lr_scales() if isinstance(model, Objective) else {}
    by_group: dict[tuple[bool, float], list[torch.nn.Parameter]] = {(False, 1.0): [], (True, 1.0): []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed", "mask_token", "start_token"))
        scale = next((factor for prefix, factor in scales.items() if name.startswith(prefix)), 1.0)
        by_group.setdefault((skip, scale), []).append(p)
    groups = [{"params": params, "weight_decay": 0.0 if skip else cfg.weight_decay,
               **({"lr_scale": scale} if scale != 1.0 else {})} for (skip, scale), params in by_group.items()]
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
    """A lower bound, in bytes, of what one training step holds on each process besides activations:
    the float views of its slice of the batch (shapes from ``model.views`` of one blank image), and
    the weights, gradients and two AdamW moments (16 bytes per parameter)."""
    blank = torch.zeros(1, data.channels, data.image_size, data.image_size, dtype=torch.uint8)
    with torch.no_grad():
        views = model.views(blank, torch.Generator().manual_seed(0))
    per_image = sum(v[:1].numel() * 4 for v in views)  # fp32 views
    per_rank = -(-recipe.optim.batch_size // rank_world()[1])
    return per_rank * per_image + 16 * sum(p.numel() for p in model.parameters())


def micro_batch(recipe: Recipe) -> int:
    """Images in one forward/backward pass of one process: the batch over processes and ``accum_steps``."""
    return -(-recipe.optim.batch_size // (rank_world()[1] * recipe.optim.accum_steps))


def activation_memory(recipe: Recipe, data: ImageDataset, model: Objective, images: int = 2) -> int:
    """Bytes of activations one image keeps for the backward pass: what a training-mode forward of
    ``images`` blank images saves for backward (autograd's saved tensors, each storage once; the
    weights, buffers and views, counted by :func:`batch_memory`, left out), per image, under the run's
    autocast. An estimate from below: transient buffers of a kernel are not seen. Zero under
    ``run.activation_checkpointing`` (blocks recompute theirs). The model is left as built: its
    buffers (BatchNorm statistics) are restored and the random state is forked."""
    if recipe.run.activation_checkpointing:
        return 0
    blank = torch.zeros(images, data.channels, data.image_size, data.image_size, dtype=torch.uint8)
    with torch.random.fork_rng():
        views = model.views(blank, torch.Generator().manual_seed(0))
    known = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(), *views]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    dtype = precision.autocast_dtype(recipe.run.precision, device(recipe.run))
    buffers, was_training = {k: v.clone() for k, v in model.named_buffers()}, model.training
    try:
        with torch.random.fork_rng(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            model.train()(views, torch.zeros(images, dtype=torch.long))
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(buffers[k])
        model.train(was_training)
    return -(-sum(saved.values()) // images)


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
    """Refuse a batch that does not fit the free memory, before the first step tries to allocate it:
    its views and the model's training state (:func:`batch_memory`) plus the activations of one
    micro-batch (:func:`micro_batch` images × :func:`activation_memory`)."""
    dev = device(recipe.run)
    free = available_memory(dev)
    if free is None:
        return
    state = batch_memory(recipe, data, model)
    if state > free:
        raise ValueError(f"optim.batch_size = {recipe.optim.batch_size} needs at least {_gib(state)} (the batch's "
                         f"views and the model's weights, gradients and optimizer state, before activations), more "
                         f"than the {_gib(free)} free on {dev.type}; lower optim.batch_size")
    micro, per_image = micro_batch(recipe), activation_memory(recipe, data, model)
    if state + micro * per_image > free:
        raise ValueError(
            f"optim.batch_size = {recipe.optim.batch_size} needs at least {_gib(state + micro * per_image)} per "
            f"process: {_gib(state)} for the batch's views and the model's weights, gradients and optimizer "
            f"state, and {_gib(micro * per_image)} of activations ({micro} images per forward pass × "
            f"{per_image / 2**20:.1f} MiB), more than the {_gib(free)} free on {dev.type}; raise optim.accum_steps, "
            f"lower optim.batch_size or set run.activation_checkpointing=true")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def random_twin(recipe: Recipe, data: ImageDataset | None = None, pretrained: Backbone | None = None) -> Backbone:
    """The backbone exactly as pretraining started it: same recipe, same seed, no training.

    Data-dependent state fitted before training (ImageGPT's and the causal LSTM's colour palette)
    must be the same too: with ``data`` (the pretraining set) the objective's ``setup`` fits it
    again; with ``pretrained`` (the trained backbone, when the data is absent) it is copied from
    there, since training never changes it. A backbone with such state and neither of them is an
    error, not a twin with the unfitted default (evenly spaced grey levels).
    """
    torch.manual_seed(recipe.run.seed)
    net = backbone(recipe.architecture)
    if data is None and pretrained is None and any(k.startswith("palette.") for k in net.state_dict()):
        raise ValueError(f"random_twin: {recipe.architecture.name}'s colour palette is fitted to the pretraining "
                         f"data; pass data= (the pretraining set) or pretrained= (the trained backbone)")
    if data is not None:
        objective(recipe, net, data).setup(data)
    elif pretrained is not None:
        fitted = {k: v for k, v in pretrained.state_dict().items() if k.startswith("palette.")}
        net.load_state_dict(fitted, strict=False)
    return net
