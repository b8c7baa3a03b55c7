"""``bigmodel`` command line: run, pretrain, transfer, ensemble, report, analyze, compare, sweep, zoo,
components, export, predict, data shard, data get (a thin layer over :mod:`bigmodel.api`,
:mod:`bigmodel.export` and :mod:`bigmodel.predict`).

Bad input prints one ``<kind> error:`` line and exits with status 2 before anything is written.

Exit status, the same for every command:

====  ==============================================================================================
0     done
2     bad input, one line on stderr naming its kind (:mod:`bigmodel.errors`): ``recipe error:``,
      ``data error:``, ``checkpoint error:``, ``image error:`` or ``export error:``
3     stopped by SIGTERM/SIGINT: the checkpoint (pretraining) or the rows done (transfer) are saved;
      rerun the same command to continue
4     training diverged (non-finite loss or gradient); the last good checkpoint is kept
5     disk full while writing a checkpoint or the metrics: the partial checkpoint is removed, the
      previous one kept; free space and rerun the same command to resume
====  ==============================================================================================
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import yaml
from rich.console import Console

from bigmodel import api
from bigmodel.analysis.compat import matrix_table
from bigmodel.data.shards import write_shards
from bigmodel.errors import DiskFull, InputError, NonFiniteLoss, RecipeError
from bigmodel.predict import lines, predict
from bigmodel.recipe import component, load_raw, zoo_names, zoo_text
from bigmodel.registry import ARCHITECTURES, DATASETS, OBJECTIVES, PROTOCOLS
from bigmodel.train import build
from bigmodel.transfer.suites import task_entry

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3
EXIT_DIVERGED = 4
EXIT_DISK_FULL = 5  # not bad input (2) nor a stop (3): nothing to fix in the command, space to free


def _recipe(args: argparse.Namespace):
    if args.resume:
        if args.recipe or args.overrides:
            raise RecipeError("--resume continues a run exactly as it was: give no recipe or overrides with it")
        return api.load_recipe(args.resume)
    return api.resolve_recipe(args.recipe, args.overrides)


def _split_recipe_arg(args: argparse.Namespace) -> None:
    """``bigmodel run optim.lr=1e-3`` has no recipe, only an override."""
    if args.recipe and "=" in args.recipe:
        args.overrides.insert(0, args.recipe)
        args.recipe = None


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    result = api.run(_recipe(args), transfer=args.command == "run", console=console)
    if result.stopped == "pretrain":
        return EXIT_STOPPED
    if result.stopped == "transfer":
        stop = result.report["stopped"]
        print(f"stopped during transfer after {stop['rows_done']} of {stop['rows']} rows; rerun the same "
              f"command to finish", file=sys.stderr)
        return EXIT_STOPPED
    return EXIT_OK


@contextlib.contextmanager
def _as_recipe_errors():
    """A missing checkpoint or data file, or a task a protocol cannot serve: one line, status 2."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        if isinstance(e, InputError):
            raise
        raise RecipeError(str(e).splitlines()[0]) from e


def cmd_transfer(args: argparse.Namespace, console: Console) -> int:
    specs = None
    if args.task or args.protocol:
        if not (args.task and args.protocol) or args.suite:
            raise RecipeError("give --task and --protocol together, or --suite NAME, or neither "
                              "(the recipe's own suite)")
        specs = [{"task": task_entry(args.task), "protocol": args.protocol}]
    with _as_recipe_errors():
        rows = api.score_checkpoint(args.checkpoint, specs, console, suite=args.suite, sets=args.set)
    if args.json:
        print(json.dumps(rows, indent=1, default=str))
    return 0


def cmd_ensemble(args: argparse.Namespace, console: Console) -> int:
    with _as_recipe_errors():
        result = api.ensemble(args.checkpoints, args.task, args.set, console, out=args.out)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    return 0


def cmd_zoo(args: argparse.Namespace, console: Console) -> int:
    if args.name:
        if args.name not in zoo_names():
            raise RecipeError(f"zoo {args.name!r}: no such recipe; zoo: {', '.join(zoo_names())}")
        print(zoo_text(args.name), end="")
        return 0
    for name in zoo_names():
        first = zoo_text(name).splitlines()[0].lstrip("# ")
        console.print(f"[bold]{name:<20}[/] {first}", highlight=False)
    return 0


def cmd_components(args: argparse.Namespace, console: Console) -> int:
    for reg in (ARCHITECTURES, DATASETS, OBJECTIVES, PROTOCOLS):
        console.print(f"[bold]{reg.kind}s[/]")
        for name in reg.names():
            console.print(f"  {name:<14} {reg.describe(name)}", highlight=False)
    console.print(matrix_table())
    return 0


def cmd_data_shard(args: argparse.Namespace, console: Console) -> int:
    """``bigmodel data shard SRC [key=value ...] DST --size N``: SRC is a registered dataset, or a
    recipe (zoo name or YAML file) whose ``data`` section is taken; ``key=value`` set that
    dataset's keys, ``split=train|test`` picks the split."""
    if args.size < 1:
        raise RecipeError(f"data shard: --size must be at least 1, got {args.size}")
    if len(args.spec) < 2:
        raise RecipeError("data shard: give SRC [key=value ...] DST, e.g. npz path=mnist.npz split=train shards/mnist")
    src, options, dst = args.spec[0], args.spec[1:-1], args.spec[-1]
    if "=" in dst:
        raise RecipeError(f"data shard: the last argument is the destination folder, got {dst!r}")
    cfg = {"name": src} if src in DATASETS else dict(load_raw(src).get("data") or {})
    for opt in options:
        key, eq, value = opt.partition("=")
        if not eq or not key:
            raise RecipeError(f"data shard: {opt!r} is not key=value")
        cfg[key] = yaml.safe_load(value) if value else ""
    split = str(cfg.pop("split", "train"))
    if split not in ("train", "test"):
        raise RecipeError(f"data.split = {split!r}: must be train or test")
    spec = component("data", cfg, DATASETS)
    try:
        data = build.dataset(spec, split)
        index = write_shards(data, dst, split, args.size, {"name": spec.name, **spec.kwargs, "split": split},
                             force=args.force)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if isinstance(e, InputError):  # a data error stays one
            raise
        raise RecipeError(str(e)) from e
    console.print(f"wrote {index['num_samples']} {split} samples in {len(index['shards'])} shards to {dst} "
                  f"(index {dst}/{split}.json)", highlight=False)
    return 0


def cmd_data_get(args: argparse.Namespace, console: Console) -> int:
    """``bigmodel data get NAME [--root DIR]``: torchvision's files → ``NAME.npz`` in the data folder."""
    from bigmodel.data.download import get

    get(args.name, args.root, console)
    return EXIT_OK


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    result = api.compare(args.runs, args.out, console)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    result = api.sweep(args.recipe, args.overrides, args.out, console)
    states = [r["state"] for r in result["runs"]]
    if "stopped" in states:
        print(f"sweep stopped after {states.count('done') + states.count('skipped')} of {len(states)} runs; "
              f"rerun the same command to continue", file=sys.stderr)
        return EXIT_STOPPED
    if "diverged" in states:
        print(f"sweep: {states.count('diverged')} of {len(states)} runs diverged (non-finite loss): "
              + ", ".join(r["name"] for r in result["runs"] if r["state"] == "diverged"), file=sys.stderr)
        return EXIT_DIVERGED
    return EXIT_OK


def cmd_analyze(args: argparse.Namespace, console: Console) -> int:
    with _as_recipe_errors():
        api.analyze(args.run_dir, args.task, args.limit, args.against, console, finetune=args.finetune)
    return EXIT_OK


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    with _as_recipe_errors():
        api.report(args.run_dir, console, figures=not args.no_figures)
    return EXIT_OK


def cmd_export(args: argparse.Namespace, console: Console) -> int:
    from bigmodel.export import export

    result = export(args.checkpoint, args.format, args.out)
    console.print(f"exported {result['format']}: " + "  ".join(result["files"]), highlight=False)
    if result["format"] == "timm":
        console.print(f"load with timm.create_model('local-dir:{result['out']}', pretrained=True)", highlight=False)
    return EXIT_OK


def cmd_predict(args: argparse.Namespace, console: Console) -> int:
    results = predict(args.checkpoint, args.images, args.top_k)
    print(json.dumps(results, indent=1) if args.json else "\n".join(lines(results)))
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigmodel", description="Pretrain vision models (architecture × dataset × "
                                "objective) and measure how they transfer.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "pretrain, transfer and report (the main job)"), ("pretrain", "pretrain only")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe", nargs="?", help="zoo name or YAML file (default: quickstart)")
        s.add_argument("overrides", nargs="*", help="section.key=value")
        s.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with its own recipe")
        s.set_defaults(fn=cmd_run)
    s = sub.add_parser("transfer", help="score a checkpoint on its recipe's transfer suite or one task")
    s.add_argument("checkpoint", help="run directory or checkpoint folder")
    s.add_argument("--suite", help="built-in suite name (digits, mnist, cifar10) or suite YAML file")
    s.add_argument("--task", help="dataset name or path to an .npz file")
    s.add_argument("--protocol", help="a transfer protocol: " + ", ".join(PROTOCOLS.names()))
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="protocol key (steps=50), task key (task.limit=500) or one entry's (3.steps=50); repeatable")
    s.add_argument("--json", action="store_true", help="also print the rows as JSON")
    s.set_defaults(fn=cmd_transfer)
    s = sub.add_parser("ensemble",
                       help="fine-tune several checkpoints on a task and score their mean-probability ensemble")
    s.add_argument("checkpoints", nargs="+", help="run directories or checkpoint folders (one member each)")
    s.add_argument("--task", required=True, help="dataset name or path to an .npz file")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="finetune key (steps=50) or task key (task.limit=500); repeatable")
    s.add_argument("--out", help="also write the result as JSON to this file")
    s.add_argument("--json", action="store_true", help="also print the result as JSON")
    s.set_defaults(fn=cmd_ensemble)
    s = sub.add_parser("zoo", help="list built-in recipes, or print one")
    s.add_argument("name", nargs="?")
    s.set_defaults(fn=cmd_zoo)
    s = sub.add_parser("components", help="list registered components and the architecture × objective matrix")
    s.set_defaults(fn=cmd_components)
    s = sub.add_parser("data", help="data tools: data shard, data get")
    data_sub = s.add_subparsers(dest="data_command", required=True)
    s = data_sub.add_parser("shard", help="write a registered dataset as WebDataset tar shards",
                            usage="bigmodel data shard SRC [key=value ...] DST [--size N] [--force]",
                            epilog="e.g. bigmodel data shard npz path=../shared/data/mnist.npz split=train "
                                   "shards/mnist --size 10000")
    s.add_argument("spec", nargs="+", metavar="ARG",
                   help="SRC (a dataset name, or a recipe whose data section is used), its key=value "
                        "settings (split=train|test picks the split), then DST, the output folder")
    s.add_argument("--size", type=int, default=10000, help="samples per shard (default 10000)")
    s.add_argument("--force", action="store_true", help="replace shards of this split already in DST")
    s.set_defaults(fn=cmd_data_shard)
    s = data_sub.add_parser("get", help="download a data set with torchvision (md5-checked) and write NAME.npz "
                                        "in the data folder, where recipes find $BIGMODEL_DATA/NAME.npz",
                            epilog="e.g. bigmodel data get mnist; then bigmodel run simclr-resnet")
    s.add_argument("name", metavar="NAME", help="mnist, fashion_mnist, cifar10, cifar100, svhn or stl10")
    s.add_argument("--root", metavar="DIR", help="data folder to fill (default $BIGMODEL_DATA, else "
                                                 "${XDG_CACHE_HOME:-~/.cache}/bigmodel); raw files go in DIR/raw")
    s.set_defaults(fn=cmd_data_get)
    s = sub.add_parser("compare", help="one table and plots across run directories (accuracy, compute, power-law fits)")
    s.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run directories (with report.json)")
    s.add_argument("--out", default="runs/compare",
                   help="folder for compare.json and compare.html (default runs/compare)")
    s.add_argument("--json", action="store_true", help="also print the comparison as JSON")
    s.set_defaults(fn=cmd_compare)
    s = sub.add_parser("sweep", help="run a grid of overrides (key=a,b,c) one after another, then compare them",
                       usage="bigmodel sweep [RECIPE] key=a,b,c [key2=x,y ...] [key=value ...] [--out DIR]",
                       epilog="e.g. bigmodel sweep quickstart run.tiny=true optim.steps=2,4,8 --out runs/sweep; "
                              "rerun the same command to resume: finished runs are skipped")
    s.add_argument("recipe", nargs="?", help="zoo name or YAML file (default: quickstart)")
    s.add_argument("overrides", nargs="*", help="section.key=a,b,c (an axis) or section.key=value (every run)")
    s.add_argument("--out",
                   help="sweep folder: one run directory per grid point, compare.html (default runs/sweep-RECIPE)")
    s.set_defaults(fn=cmd_sweep)
    s = sub.add_parser("analyze",
                       help="linear probe per block (pretrained vs random init) and linear CKA between layers")
    s.add_argument("run_dir", metavar="RUN_DIR", help="run directory or checkpoint folder")
    s.add_argument("--task", required=True, help="dataset name or path to an .npz file")
    s.add_argument("--limit", type=int, help="use the first N images of each split")
    s.add_argument("--against", metavar="RUN_DIR|CKPT",
                   help="CKA against this backbone (same architecture) instead of the random-init twin")
    s.add_argument("--finetune", nargs="*", metavar="KEY=VALUE",
                   help="CKA against a fine-tuned copy of the backbone (fine-tuned on the task's train split "
                        "with the finetune protocol; KEY=VALUE set its keys, e.g. steps=300 batch_size=128)")
    s.set_defaults(fn=cmd_analyze)
    s = sub.add_parser("export", help="write a checkpoint's model (backbone and class head) as a timm model, ONNX or "
                       "safetensors (backbone only), with its preprocessing",
                       epilog="timm: model.safetensors + config.json for "
                              "timm.create_model('local-dir:OUT', pretrained=True); "
                              "onnx: model.onnx (images -> logits and pooled features; backbone.onnx, features only, "
                              "for a checkpoint without a class head; dynamic batch); safetensors: "
                              "backbone.safetensors (our names, no heads); each with config.json "
                              "(input size, mean, std, interpolation, the recipe's architecture section)")
    s.add_argument("checkpoint", metavar="RUN_DIR|CKPT",
                   help="run directory (its latest intact checkpoint) or checkpoint folder")
    s.add_argument("--format", required=True, metavar="FORMAT", help="timm, onnx or safetensors")
    s.add_argument("--out", metavar="PATH", help="output folder (default RUN_DIR/export/FORMAT); for onnx, a name "
                   "ending in .onnx is the model file itself, config.json beside it")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("predict", help="top classes of image files from a supervised or fine-tuned checkpoint")
    s.add_argument("checkpoint", metavar="RUN_DIR|CKPT", help="run directory or checkpoint folder with a class head")
    s.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, ... as PIL reads them)")
    s.add_argument("--top-k", type=int, default=5, help="classes per image, most probable first (default 5)")
    s.add_argument("--json", action="store_true", help="print the predictions as JSON instead of one line per image")
    s.set_defaults(fn=cmd_predict)
    s = sub.add_parser("report",
                       help="rebuild a run's report.json/html and figures from its files (no data, no training)")
    s.add_argument("run_dir", help="run directory")
    s.add_argument("--no-figures", action="store_true", help="keep the figures under RUN_DIR/figures as they are")
    s.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if hasattr(args, "overrides"):
        _split_recipe_arg(args)
    console = Console()
    try:
        return args.fn(args, console)
    except InputError as e:
        print(f"{e.kind} error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except DiskFull as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_DISK_FULL


if __name__ == "__main__":
    sys.exit(main())
