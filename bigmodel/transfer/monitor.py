"""``run.monitor``: transfer measured while pretraining runs.

A frozen-feature protocol (kNN, linear, few-shot) scores the backbone on a fixed subset of a task
every ``every`` pretraining steps, at step 0 (the random-init baseline) and at the last step; the
trainer (:func:`bigmodel.train.trainer.fit`) calls a :class:`Monitor` through its one hook
(``Loop.monitor``), writes what it returns as a ``metrics.jsonl`` record of that step (``monitor_top1``,
``monitor_s``) and keeps its time out of ``images_per_s``. The report draws it against pretraining
steps and FLOPs (:mod:`bigmodel.analysis.curves`).

The fixed subset is at most ``limit`` images of each split, drawn once by a generator seeded with 0
(:func:`subset`), so every evaluation of a run, and every run, scores the same images. The probe
runs the backbone in eval mode without gradients and never touches the training RNG (the trainer
forks it around the hook), so a run with the monitor ends with the weights of one without it.

Under torchrun every rank calls the monitor at the same steps. With FSDP2 the shards are first
gathered into the plain objective (a collective, on every rank, as :func:`bigmodel.train.distributed.unwrap`
does after training); then rank 0 alone computes the features and the score, on the module's own
device (host memory for FSDP, as transfer after pretraining), while the other ranks go on and wait
for it at the next step's gradient reduction.
"""

from __future__ import annotations

from typing import Any

import torch

from bigmodel.errors import RecipeError
from bigmodel.recipe import MonitorSpec
from bigmodel.registry import PROTOCOLS
from bigmodel.train import distributed
from bigmodel.transfer import base, suites

SUBSET_SEED = 0


def subset(data: Any, limit: int | None) -> Any:
    """At most ``limit`` images of ``data`` (a seeded draw, kept in the data's order); all without a limit."""
    if limit is None or len(data) <= limit:
        return data
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(SUBSET_SEED))
    return data.subset(order[:limit].sort().values)


def splits(spec: MonitorSpec) -> tuple[Any, Any]:
    """The monitor's fixed ``(train, test)`` subsets of its task."""
    train, test = suites.task_splits(spec.task)
    return subset(train, spec.limit), subset(test, spec.limit)


def check(spec: MonitorSpec | None) -> None:
    """Refuse, before anything runs, a monitor its task cannot serve (kNN's ``k`` above the subset's
    training images, a task with one class): a :class:`RecipeError` naming ``run.monitor``. Building
    the task also raises a missing data file's one-line error here."""
    if spec is None:
        return
    train, _ = splits(spec)
    try:
        PROTOCOLS.build(spec.protocol.name, **spec.protocol.kwargs).check(train.targets)
    except ValueError as e:
        raise RecipeError(f"run.monitor ({suites.task_name(spec.task.name, spec.task.kwargs)} · "
                          f"{spec.protocol.name}, limit {spec.limit}): {e}") from None


class Monitor:
    """The callable ``(step, net) -> {"monitor_top1": ..., ...}`` that the trainer's hook runs.

    Args:
        spec: the recipe's ``run.monitor``.
        model: the plain objective being pretrained (``net`` unwrapped; under FSDP2 the copy that
            the gathered weights are loaded into).
        batch_size, dtype: of the feature pass (``run.eval_batch_size``, the run's autocast dtype).
    """

    def __init__(self, spec: MonitorSpec, model: torch.nn.Module, batch_size: int = 256,
                 dtype: torch.dtype | None = None):
        self.spec, self.model, self.batch_size, self.dtype = spec, model, batch_size, dtype
        self.protocol = PROTOCOLS.build(spec.protocol.name, **spec.protocol.kwargs)
        self.main = distributed.is_main()
        with torch.random.fork_rng(devices=[]):  # whatever building the task draws, the run does not see
            self.train, self.test = splits(spec) if self.main else (None, None)  # only rank 0 scores

    def __call__(self, step: int, net: torch.nn.Module) -> dict[str, float]:
        if distributed.sharded(net):  # a collective: every rank gathers the shards at this step
            distributed.unwrap(net, self.model)
            backbone = self.model.backbone
        else:
            backbone = distributed.unwrapped(net).backbone
        if not self.main:
            return {}
        x_train, x_test = (base.features(backbone, split, self.batch_size, self.dtype)
                           for split in (self.train, self.test))
        out = self.score(x_train, x_test)
        if step == 0:  # the reader's other baseline, once: the same probe on the raw pixels
            pixels = self.score(base.pixels(self.train), base.pixels(self.test))
            out.update({f"{k}_pixels": v for k, v in pixels.items()})
        return out

    def score(self, x_train: torch.Tensor, x_test: torch.Tensor) -> dict[str, float]:
        res = self.protocol.fit_score(x_train, self.train.targets, x_test, self.test.targets)
        return {f"monitor_{k}": float(v) for k, v in res.items()
                if isinstance(v, int | float) and not isinstance(v, bool)}
