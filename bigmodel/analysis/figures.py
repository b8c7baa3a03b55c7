"""The figures of one run, built from its directory alone (DESIGN.md §4): PNGs under
``RUN_DIR/figures/``, embedded in ``report.html`` by :mod:`bigmodel.analysis.report`.

- ``curves.png`` — loss and learning rate from ``metrics.jsonl``;
- ``confusion.png`` — a linear probe on the first transfer task, fitted here;
- ``tsne.png`` — frozen test features of that task, pretrained beside the random-init twin;
- one figure per model builder of :data:`BUILDERS` that applies to the model (attention rollout
  for ViT, Grad-CAM for CNNs, MAE reconstructions, autoregressive completions, expert load).

A model builder is a module of :mod:`bigmodel.analysis` exposing
``make(model, images, labels, out) -> Path | None``: ``model`` the objective (backbone under
``model.backbone``), ``images`` uint8 ``(N, C, H, W)`` test images, ``labels`` ``(N,)``, ``out``
the figures folder; it returns the PNG it wrote, or ``None`` when it does not apply. Modules not
installed (yet) are skipped.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bigmodel import loader
from bigmodel.analysis import confusion, curves, embedding
from bigmodel.train import build
from bigmodel.train.metrics import read_metrics
from bigmodel.transfer.suites import task_name, task_splits

BUILDERS = ("attention", "gradcam", "reconstruction", "completions", "expert_load")
SAMPLES = 8  # test images shown by the model builders
PROBE_TRAIN, PROBE_TEST = 2000, 1000  # images of the confusion-matrix probe
TSNE_IMAGES = 500
TSNE_IMAGES_TINY = 150  # run.tiny: a map that draws in well under a second (the test suite draws many)


def load_objective(run_dir: Path) -> tuple[Any, Path, Any]:
    """The objective (backbone and heads) of a run's latest intact checkpoint, rebuilt by the
    loader (:func:`bigmodel.loader.pretraining`) without the pretraining data, in eval mode on the
    run's device; returns ``(objective, checkpoint folder, recipe)``.

    Raises:
        CheckpointError: no intact checkpoint, a fine-tune's, or weights that do not fit.
    """
    m = loader.pretraining(run_dir)
    return m.objective, m.checkpoint, m.recipe


def _subset(data: Any, n: int, seed: int = 0) -> Any:
    """A seeded subset of at most ``n`` images, in the data's order."""
    if len(data) <= n:
        return data
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values)


def task_data(recipe: Any) -> tuple[str, Any, Any] | None:
    """``(name, train, test)`` of the recipe's first transfer task (seeded subsets of at most
    :data:`PROBE_TRAIN` / :data:`PROBE_TEST` images), or ``None`` without a transfer section."""
    if not recipe.transfer:
        return None
    spec = recipe.transfer[0].task
    name = task_name(spec.name, spec.kwargs)
    train, test = task_splits(spec)
    return name, _subset(train, PROBE_TRAIN), _subset(test, PROBE_TEST)


def model_figures(model: Any, images: torch.Tensor, labels: torch.Tensor, out: Path,
                  console: Console | None = None) -> list[Path]:
    """Run every model builder of :data:`BUILDERS` present; returns the PNGs written."""
    written = []
    for name in BUILDERS:
        try:
            module = importlib.import_module(f"bigmodel.analysis.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"bigmodel.analysis.{name}":
                raise
            continue
        path = module.make(model, images, labels, out)
        if path is not None:
            written.append(Path(path))
            if console:
                console.print(f"  figure {path}", highlight=False)
    return written


def make_all(run_dir: Path, console: Console | None = None) -> list[Path]:
    """Write every figure that applies to the run in ``run_dir`` into ``run_dir/figures``;
    returns their paths. Figures that need the transfer task's data are skipped, with a note,
    when it cannot be loaded here (the others still come)."""
    console = console or Console(quiet=True)
    run_dir = Path(run_dir)
    out = run_dir / "figures"
    out.mkdir(exist_ok=True)
    written = []
    if (run_dir / "metrics.jsonl").is_file():
        path = curves.make(read_metrics(run_dir / "metrics.jsonl"), out)
        written += [path] if path else []
    model, _, recipe = load_objective(run_dir)
    try:
        task = task_data(recipe)
    except (ValueError, FileNotFoundError, OSError) as e:
        console.print(f"figures: transfer task data unavailable ({str(e).splitlines()[0]}); "
                      f"skipping the probe, t-SNE and sample-image figures", highlight=False)
        task = None
    if task is not None:
        name, train, test = task
        dev = next(model.parameters()).device
        dtype = build.autocast_dtype(recipe.run, dev)  # the transfer table's: the figure's top-1 is its linear row
        with torch.no_grad():
            written.append(confusion.make(model.backbone, train, test, out, task=name, classes=test.classes,
                                          dtype=dtype)[0])
            few = _subset(test, TSNE_IMAGES_TINY if recipe.run.tiny else TSNE_IMAGES)
            twin = build.random_twin(recipe, pretrained=model.backbone).to(dev).eval()
            written.append(embedding.make({"pretrained": model.backbone, "random init": twin}, few, out, task=name)[0])
        written += model_figures(model, test.images[:SAMPLES], test.targets[:SAMPLES], out, console)
    return written
