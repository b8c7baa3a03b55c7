"""Transfer protocols side by side for one pretrained checkpoint: fine-tuning (BiT-HyperRule, shortened
for a CPU) vs linear probe vs kNN vs few-shot (1/5/10) on MNIST and CIFAR-10 from ../shared/data.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/transfer_protocols.py --checkpoint /tmp/b1/qs \\
        --pretrain architecture.patch_size=8 optim.steps=400 optim.warmup_steps=40 \\
        --out /tmp/b1/transfer_protocols.md
    # the fine-tuning rows again with a higher learning rate than the rule's:
    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/transfer_protocols.py --checkpoint /tmp/b1/qs \\
        --protocols finetune --finetune steps=200 batch_size=128 lr=0.03 grad_clip=1.0 --name protocols-lr0.03

With ``--pretrain`` the checkpoint is made first (``bigmodel pretrain quickstart OVERRIDES``) unless
the directory already holds one. Writes a markdown table (and prints it); the rows with every
setting, schedule and version are saved by ``bigmodel.api.transfer`` in
``CHECKPOINT/transfer/protocols.json``.
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
                   help="make the checkpoint with `bigmodel pretrain quickstart KEY=VALUE...` first")
    p.add_argument("--data", default=None, help="folder with mnist.npz and cifar10.npz (default: ../shared/data)")
    p.add_argument("--mnist-limit", type=int, default=10_000, help="first N images of each MNIST split")
    p.add_argument("--cifar-limit", type=int, default=None, help="first N images of each CIFAR-10 split")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5, 10])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--finetune", nargs="*", default=["steps=200", "batch_size=128"], metavar="KEY=VALUE",
                   help="finetune overrides of BiT-HyperRule (default: a CPU-sized schedule)")
    p.add_argument("--protocols", nargs="+", default=["finetune", "linear", "knn", "fewshot"],
                   help="which protocols to run (default: all four)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="transfer_protocols.md")
    p.add_argument("--name", default="protocols", help="report name: CHECKPOINT/transfer/NAME.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from bigmodel import api
    from bigmodel.recipe import parse_override, resolve
    from bigmodel.train import checkpoint
    from bigmodel.transfer.suites import shared_data

    t_start = time.perf_counter()
    run_dir = Path(args.checkpoint)
    pretrain_s = None
    if args.pretrain is not None and checkpoint.latest(run_dir) is None:
        t0 = time.perf_counter()
        api.run(resolve("quickstart", [f"run.out={run_dir}", *args.pretrain]), transfer=False)
        pretrain_s = time.perf_counter() - t0
    data = Path(args.data) if args.data else shared_data()
    finetune = {}
    for kv in args.finetune:
        path, value = parse_override(kv)
        finetune[".".join(path)] = value
    entries = []
    for name, limit, flip in (("mnist", args.mnist_limit, False), ("cifar10", args.cifar_limit, True)):
        task = {"name": "npz", "path": str(data / f"{name}.npz"), **({"limit": limit} if limit else {})}
        entries += [e for e in ({"task": task, "protocol": "linear"},
                                {"task": task, "protocol": "knn", "k": 20},
                                {"task": task, "protocol": "fewshot", "shots": args.shots, "seeds": args.seeds},
                                {"task": task, "protocol": "finetune", "flip": flip, **finetune})
                    if e["protocol"] in args.protocols]
    t0 = time.perf_counter()
    rows = api.transfer(run_dir, entries, name=args.name)
    transfer_s = time.perf_counter() - t0
    text = markdown(rows, args, run_dir, pretrain_s, transfer_s, time.perf_counter() - t_start)
    Path(args.out).write_text(text)
    print(text)


def markdown(rows, args, run_dir, pretrain_s, transfer_s, total_s) -> str:
    from bigmodel.train import checkpoint
    from bigmodel.transfer.suite import task_label

    meta = checkpoint.load_meta(checkpoint.latest(run_dir))
    arch = meta["recipe"]["architecture"]
    shots = args.shots
    head = ["task", "n_train / n_test", "fine-tune", "linear", "kNN (k=20)", *(f"{k}-shot" for k in shots)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for task in dict.fromkeys(task_label(r) for r in rows):
        by = {r["protocol"]: r for r in rows if task_label(r) == task}
        res = {k: r["results"]["pretrained"] for k, r in by.items()}
        few = res["fewshot"]["per_shot"] if "fewshot" in res else {}
        top1 = {k: f"{v['top1']:.2f}" for k, v in res.items()}
        first = next(iter(by.values()))
        cells = [task, f"{first['n_train']} / {first['n_test']}",
                 *(top1.get(k, "–") for k in ("finetune", "linear", "knn")),
                 *(f"{few[k]['mean']:.2f} ± {few[k]['std']:.2f}" if k in few else "–" for k in shots)]
        lines.append("| " + " | ".join(cells) + " |")
        note = f"- {task}: seconds: " + ", ".join(f"{k} {v['seconds']:.0f}" for k, v in res.items())
        if "finetune" in res:
            s, ft = res["finetune"]["schedule"], by["finetune"]["settings"]
            note += (f"; fine-tune {s['steps']} steps × batch {s['batch_size']} (BiT regime '{s['regime']}', "
                     f"lr {s['lr']:g}, warm-up {s['warmup_steps']}, ÷10 at {list(s['decay_steps'])}, MixUp α "
                     f"{s['mixup_alpha']}, train resize {s['resize']}→crop {s['crop']}, flip {ft['flip']}, "
                     f"grad clip {ft['grad_clip']})")
        notes.append(note)
    pre = f"{pretrain_s:.0f} s" if pretrain_s is not None else "reused"
    return "\n".join([
        f"### Transfer protocols — one checkpoint ({arch['name']} {arch.get('size')}, {arch.get('image_size')}² px, "
        f"patch {arch.get('patch_size')}, step {meta['step']})", "",
        "Top-1 % on the test split; few-shot: mean ± std over seeds "
        f"0..{args.seeds - 1}, logistic regression on frozen features.", "", *lines, "", *notes, "",
        f"Wall time: pretraining {pre}, transfer {transfer_s:.0f} s, total {total_s:.0f} s "
        f"({args.threads} thread{'s' if args.threads > 1 else ''}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}).",
        "",
    ])


if __name__ == "__main__":
    main()
