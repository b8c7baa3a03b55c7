"""Transfer protocols and frozen-feature extraction (DESIGN.md §3).

A protocol scores a backbone on a task (a train split and a test split). Frozen-feature protocols
(:class:`FrozenProtocol`) see only features, so the same protocol also scores raw pixels: the
baseline that shows what pretraining bought. :meth:`Protocol.check` refuses settings a task cannot
serve (more kNN neighbours than training images, more shots than a class has, one class) before
any feature is computed.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import torch
from rich.console import Console

from bigmodel.architectures.base import Backbone
from bigmodel.data.base import TensorImages
from bigmodel.data.transforms import to_input
from bigmodel.train.metrics import StepProgress

_clock = time.perf_counter  # replaced by tests for exact rates


class ImageProgress:
    """Progress of work counted in images, shown as pretraining shows steps: on a terminal the
    same live bar (:class:`StepProgress`: done/total, images/s, ETA); elsewhere (logs, pipes) one
    line at most every ``every`` seconds and one at the end, e.g.
    ``features digits/train · pretrained: 1347/1347 images  5120 images/s``. Silent without a console.
    """

    def __init__(self, console: Console | None, total: int, label: str, every: float = 10.0):
        self.console, self.total, self.label, self.every = console, total, label, every
        self.bar = StepProgress(console, total, 0, label) if console is not None else None
        self.t0 = self.last = _clock()

    def __enter__(self) -> ImageProgress:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, done: int) -> None:
        if self.bar is None:
            return
        now = _clock()
        rate = done / max(now - self.t0, 1e-9)
        if self.bar.live:
            self.bar.update(done, {"images/s": rate})
        elif done >= self.total or now - self.last >= self.every:
            self.last = now
            eta = "" if done >= self.total else f"  eta {(self.total - done) / rate:.0f}s"
            self.console.print(f"{self.label}: {done}/{self.total} images  {rate:.0f} images/s{eta}", highlight=False)


@torch.inference_mode()
def features(backbone: Backbone, data: TensorImages, batch_size: int = 256,
             dtype: torch.dtype | None = None, console: Console | None = None,
             label: str = "features") -> torch.Tensor:
    """Pooled features ``(N, feature_dim)`` (float32, CPU) of every image, backbone in eval mode.
    With a ``console``, progress is shown under ``label`` (:class:`ImageProgress`)."""
    was_training = backbone.training
    backbone.eval()
    dev = next(backbone.parameters()).device
    out = []
    with ImageProgress(console, len(data), label) as progress:
        for i in range(0, len(data), batch_size):
            x = to_input(data.images[i:i + batch_size], backbone.image_size, backbone.in_chans).to(dev)
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out.append(backbone(x).float().cpu())
            progress.update(min(i + batch_size, len(data)))
    backbone.train(was_training)
    return torch.cat(out)


def pixels(data: TensorImages) -> torch.Tensor:
    """Raw-pixel features ``(N, C·H·W)`` in [0, 1]."""
    return data.images.flatten(1).float() / 255.0


class Protocol:
    """Base of all protocols. ``frozen`` protocols implement :meth:`fit_score`."""

    frozen: ClassVar[bool] = True

    def settings(self) -> dict[str, Any]:
        """The exact settings that produced a number (evaluation provenance)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def check(self, targets: torch.Tensor) -> None:
        """Raise ``ValueError`` (one line: the setting, its value, the limit) when these settings
        cannot run on a training split with labels ``targets`` ``(N,)`` (-1 = unlabelled)."""
        if len(targets) == 0 or bool((targets < 0).all()):
            raise ValueError("the task's training split has no labelled images; transfer needs class labels")
        classes = targets[targets >= 0].unique()
        if len(classes) < 2:
            raise ValueError(f"the task's training split has only class {int(classes[0])}; "
                             "a transfer protocol needs at least 2 classes")

    def fit_score(self, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                  y_test: torch.Tensor) -> dict[str, float]:
        """Fit on ``(N, D)`` train features, return at least ``{"top1": accuracy in %}`` on test."""
        raise NotImplementedError
