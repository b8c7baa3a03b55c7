"""Transfer protocols side by side for one pretrained checkpoint: fine-tuning (BiT-HyperRule, shortened
for a CPU) vs linear probe vs kNN vs few-shot (1/5/10) on MNIST and CIFAR-10 from ../shared/data.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/transfer_protocols.py --checkpoint /tmp/b1/qs \\
        --pretrain architecture.patch_size=8 optim.steps=400 optim.warmup_steps=40 \\
        --out /tmp/b1/transfer_protocols.md
    # fine-tuning only, beside the same protocol on the random-init twin (from scratch):
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/transfer_protocols.py --checkpoint runs/simclr-resnet \\
        --protocols finetune --finetune schedule_scale=0.1 --mnist-limit 0 --from-scratch --name finetune-scratch

``--from-scratch`` also fine-tunes the checkpoint's random-init twin (``build.random_twin``: the
recipe's architecture and seed, no training) with the same protocol and steps, in its own column.
With ``--pretrain`` the checkpoint is made first (``bigmodel pretrain fractals-vit OVERRIDES``) unless
the directory already holds one. Writes a markdown table (and prints it); the rows with every
setting, schedule and version are saved in ``CHECKPOINT/transfer/NAME.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="run directory (created with --pretrain if absent)")
    p.add_argument("--pretrain", nargs="*", default=None, metavar="KEY=VALUE",
                   help="make the checkpoint with `bigmodel pretrain fractals-vit KEY=VALUE...` first")
    p.add_argument("--data", default=None, help="folder with mnist.npz and cifar10.npz (default: ../shared/data)")
    p.add_argument("--mnist-limit", type=int, default=10_000, help="first N images of each MNIST split (0: all)")
    p.add_argument("--cifar-limit", type=int, default=None, help="first N images of each CIFAR-10 split")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--finetune", nargs="*", default=["steps=200", "batch_size=128"], metavar="KEY=VALUE",
                   help="finetune overrides of BiT-HyperRule (default: a CPU-sized schedule)")
    p.add_argument("--protocols", nargs="+", default=["finetune", "linear", "knn", "fewshot"],
                   help="which protocols to run (default: all four)")
    p.add_argument("--tasks", nargs="+", default=["mnist", "cifar10"], choices=["mnist", "cifar10"],
                   help="which tasks to run (default: both)")
    p.add_argument("--from-scratch", action="store_true",
                   help="also fine-tune the random-init twin of the backbone with the same protocol")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="transfer_protocols.md")
    p.add_argument("--name", default="protocols", help="report name: CHECKPOINT/transfer/NAME.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from bigmodel import api
    from bigmodel.recipe import parse_override, resolve
    from bigmodel.train import build, checkpoint
    from bigmodel.transfer import suites
    from bigmodel.transfer.runner import provenance, run_suite, write_report

    t_start = time.perf_counter()
    run_dir = Path(args.checkpoint)
    pretrain_s = None
    if args.pretrain is not None and checkpoint.latest(run_dir) is None:
        t0 = time.perf_counter()
        api.run_pipeline(resolve("fractals-vit", [f"run.out={run_dir}", *args.pretrain]), transfer=False)
        pretrain_s = time.perf_counter() - t0
    data = Path(args.data) if args.data else suites.shared_data()
    finetune = {}
    for kv in args.finetune:
        path, value = parse_override(kv)
        finetune[".".join(path)] = value
    entries = []
    for name, limit, flip in (("mnist", args.mnist_limit, False), ("cifar10", args.cifar_limit, True)):
        if name not in args.tasks:
            continue
        task = {"name": "npz", "path": str(data / f"{name}.npz"), **({"limit": limit} if limit else {})}
        entries += [e for e in ({"task": task, "protocol": "linear"},
                                {"task": task, "protocol": "knn", "k": 20},
                                {"task": task, "protocol": "fewshot", "shots": args.shots, "seeds": args.seeds},
                                {"task": task, "protocol": "finetune", "flip": flip, **finetune})
                    if e["protocol"] in args.protocols]
    t0 = time.perf_counter()
    net, found, recipe = api.load_backbone(run_dir)
    dev = next(net.parameters()).device
    dtype = build.autocast_dtype(recipe.run, dev)
    specs = suites.specs(entries)
    rows = run_suite(specs, {"pretrained": net}, recipe.run.eval_batch_size, dtype)
    if args.from_scratch:  # the same fine-tuning protocol and steps on the random-init twin
        twin = build.random_twin(recipe, pretrained=net).to(dev)  # the fitted palette too
        for row, spec in zip(rows, specs, strict=True):
            if spec.protocol.name == "finetune":
                row["results"].update(run_suite([spec], {"from_scratch": twin})[0]["results"])
    write_report(api.run_dir_of(found) / "transfer" / f"{args.name}.json", rows,
                 provenance(found, checkpoint.load_meta(found)["step"], dtype, str(dev), suite=args.name,
                            architecture=recipe.raw["architecture"], from_scratch=args.from_scratch))
    transfer_s = time.perf_counter() - t0
    text = markdown(rows, args, run_dir, pretrain_s, transfer_s, time.perf_counter() - t_start)
    Path(args.out).write_text(text)
    print(text)


def markdown(rows, args, run_dir, pretrain_s, transfer_s, total_s) -> str:
    from bigmodel.train import checkpoint
    from bigmodel.transfer.runner import task_label

    meta = checkpoint.load_meta(checkpoint.latest(run_dir))
    arch = meta["recipe"]["architecture"]
    shots = args.shots
    scratch = ["fine-tune from scratch"] if args.from_scratch else []
    head = ["task", "n_train / n_test", "fine-tune", *scratch, "linear", "kNN (k=20)", *(f"{k}-shot" for k in shots)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for task in dict.fromkeys(task_label(r) for r in rows):
        by = {r["protocol"]: r for r in rows if task_label(r) == task}
        res = {k: r["results"]["pretrained"] for k, r in by.items()}
        few = res["fewshot"]["per_shot"] if "fewshot" in res else {}
        top1 = {k: f"{v['top1']:.2f}" for k, v in res.items()}
        first = next(iter(by.values()))
        ft_scratch = by.get("finetune", {}).get("results", {}).get("from_scratch")
        cells = [task, f"{first['n_train']} / {first['n_test']}", top1.get("finetune", "–"),
                 *([f"{ft_scratch['top1']:.2f}" if ft_scratch else "–"] if scratch else []),
                 *(top1.get(k, "–") for k in ("linear", "knn")),
                 *(f"{few[k]['mean']:.2f} ± {few[k]['std']:.2f}" if k in few else "–" for k in shots)]
        lines.append("| " + " | ".join(cells) + " |")
        note = f"- {task}: seconds: " + ", ".join(f"{k} {v['seconds']:.0f}" for k, v in res.items())
        if "finetune" in res:
            s, ft, o = res["finetune"]["schedule"], by["finetune"]["settings"], res["finetune"]["optimizer"]
            note += (f"; fine-tune {s['steps']} steps × batch {s['batch_size']} (BiT regime '{s['regime']}', "
                     f"{o['family']}: {o['optimizer']}, lr {s['lr']:g}, weight decay {s['weight_decay']:g}, "
                     f"layer decay {o['layer_decay']:g}, drop path {o['drop_path']:g}, grad clip {o['grad_clip']}, "
                     f"warm-up {s['warmup_steps']}, "
                     + (f"÷10 at {list(s['decay_steps'])}" if s.get("decay", "step") == "step" else "cosine")
                     + f", MixUp α "
                     f"{s['mixup_alpha']}, train resize {s['resize']}→crop {s['crop']}, flip {ft['flip']})")
        notes.append(note)
    pre = f"{pretrain_s:.0f} s" if pretrain_s is not None else "reused"
    return "\n".join([
        f"### Transfer protocols — one checkpoint ({arch['name']} {arch.get('size')}, {arch.get('image_size')}² px, "
        f"patch {arch.get('patch_size')}, step {meta['step']})", "",
        "Top-1 % on the test split; few-shot: mean ± std over seeds "
        f"0..{args.seeds - 1}, logistic regression on frozen features.", "", *lines, "", *notes, "",
        f"Wall time: pretraining {pre}, transfer {transfer_s:.0f} s, total {total_s:.0f} s "
        f"({args.threads} thread{'s' if args.threads > 1 else ''}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}).",
        "",
    ])


if __name__ == "__main__":
    main()
