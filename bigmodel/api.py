"""The Python API; the CLI is a thin layer over it.

``run`` is the main job: pretrain → transfer suite (pretrained vs random-init twin vs pixels) →
report. Everything that can fail on bad input (validation, building the data and the model)
happens before the run directory is touched.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from bigmodel.analysis import report
from bigmodel.recipe import Recipe, RecipeError, validate
from bigmodel.train import build, checkpoint
from bigmodel.train.trainer import pretrain
from bigmodel.transfer.suite import PIXELS, run_suite, table


def prepare_run_dir(recipe: Recipe) -> Path:
    """Refuse to mix two recipes in one run directory; otherwise create it and save recipe.yaml."""
    run_dir = Path(recipe.run.out)
    saved = run_dir / "recipe.yaml"
    if saved.exists():
        previous = yaml.safe_load(saved.read_text())
        if _strip(previous) != _strip(recipe.raw):
            keys = sorted(k for k in set(previous) | set(recipe.raw) if previous.get(k) != recipe.raw.get(k))
            raise RecipeError(f"run.out={str(run_dir)!r} holds a run of a different recipe (sections differ: "
                              f"{', '.join(keys)}); choose another run.out or --resume {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = saved.with_suffix(".yaml.tmp")
    tmp.write_text(recipe.to_yaml())
    tmp.replace(saved)
    return run_dir


def _strip(raw: dict[str, Any]) -> dict[str, Any]:
    """Parts of a recipe that may change between a run and its resumption (how it logs, not what it computes)."""
    run = {k: v for k, v in (raw.get("run") or {}).items() if k not in ("log_every", "num_workers", "eval_batch_size")}
    return {**raw, "run": run}


def load_recipe(run_dir: Path) -> Recipe:
    path = Path(run_dir) / "recipe.yaml"
    if not path.is_file():
        raise RecipeError(f"--resume {run_dir}: no recipe.yaml there; is it a bigmodel run directory?")
    raw = yaml.safe_load(path.read_text())
    raw.setdefault("run", {})["out"] = str(run_dir)
    return validate(raw)


def run(recipe: Recipe, console: Console | None = None, transfer: bool = True) -> dict[str, Any]:
    """Pretrain, transfer and report. Returns the report dict (also written to report.json)."""
    console = console or Console()
    t0 = time.perf_counter()
    try:
        data, model = build.experiment(recipe)
    except (ValueError, FileNotFoundError) as e:  # problems only building reveals, still before any write
        raise RecipeError(str(e)) from e
    run_dir = prepare_run_dir(recipe)
    console.print(f"[bold]bigmodel run[/] → {run_dir}   {recipe.architecture.name} × {recipe.data.name} × "
                  f"{recipe.objective.name}   ({len(data)} training images)")
    summary = pretrain(recipe, run_dir, data, model, console)
    result: dict[str, Any] = {"recipe": recipe.raw, "pretrain": {**summary, "seconds": round(time.perf_counter() - t0, 1)}}
    if summary["stopped"]:
        return result
    backbone = model.backbone
    result["model"] = {"backbone_params": backbone.num_params(), "total_params": sum(p.numel() for p in model.parameters()),
                       "forward_gflops_per_image": round(report.forward_gflops(backbone), 4)}
    if transfer and recipe.transfer:
        t1 = time.perf_counter()
        subjects = {"pretrained": backbone, "random_init": build.random_twin(recipe, data).to(build.device(recipe.run)),
                    PIXELS: None}
        rows = run_suite(recipe.transfer, subjects, recipe.run.eval_batch_size,
                         build.autocast_dtype(recipe.run, build.device(recipe.run)), console)
        result["transfer"] = rows
        result["transfer_seconds"] = round(time.perf_counter() - t1, 1)
        console.print(table(rows))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    json_path, html_path = report.write(run_dir, result)
    console.print(f"report: {json_path}  {html_path}   ({result['seconds']:.0f}s)")
    return result


def transfer(ckpt: str | Path, specs: list | None = None, console: Console | None = None) -> list[dict[str, Any]]:
    """Score a checkpoint (a run directory or a checkpoint folder) on transfer specs
    (default: its recipe's transfer section)."""
    console = console or Console()
    found = checkpoint.latest(Path(ckpt))
    if found is None:
        raise FileNotFoundError(f"{ckpt}: no complete checkpoint (expected a run directory or checkpoints/step_*)")
    recipe = validate(checkpoint.load_meta(found)["recipe"])
    net = build.backbone(recipe.architecture)
    checkpoint.load_weights(found, net, prefix="backbone.")
    dev = build.device(recipe.run)
    rows = run_suite(specs if specs is not None else recipe.transfer, {"pretrained": net.to(dev)},
                     recipe.run.eval_batch_size, build.autocast_dtype(recipe.run, dev), console)
    console.print(table(rows))
    return rows
