"""The cost of ``run.monitor`` relative to pretraining, as a ratio measured in one process.

    python benchmarks/monitor_cost.py [RECIPE] [--rounds 4] [--steps 10] [key=value ...]

Builds RECIPE (default: the quick start, with its ``run.monitor``) as ``bigmodel pretrain`` does and
alternates, ``--rounds`` times, ``--steps`` training steps (:func:`bigmodel.train.trainer.train_step`,
the run's precision) with one monitor evaluation (:class:`bigmodel.transfer.monitor.Monitor`, as the
trainer calls it). Both are timed under the same conditions, so the ratio (one evaluation in
training steps) holds on a busy machine, where wall times do not; the share of pretraining is
``evaluations × ratio / optim.steps`` with ``optim.steps // every + 1`` evaluations (step 0 included).
Prints one line per round and the summary.
"""

from __future__ import annotations

import argparse
import time

import torch

from bigmodel.recipe import resolve
from bigmodel.train import build, trainer
from bigmodel.transfer.monitor import Monitor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default="fractals-vit")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    r = resolve(args.recipe, args.overrides)
    if r.run.monitor is None:
        raise SystemExit(f"{args.recipe}: no run.monitor; give one, e.g. 'run.monitor={{task: digits, protocol: knn}}'")
    data, model = build.experiment(r)
    dev = build.device(r.run)
    dtype = build.autocast_dtype(r.run, dev)
    model.setup(data)
    model.to(dev).train()
    opt = build.optimizer(model, r.optim)
    probe = Monitor(r.run.monitor, model, r.run.eval_batch_size, dtype)
    batches = build.batches(data, r.optim.batch_size, r.run.seed, 0, r.optim.steps, 0, 0, 1, r.optim.accum_steps)
    print(f"{args.recipe}: precision {dtype or torch.float32}, {torch.get_num_threads()} threads")
    probe(0, model)  # warm-up: first allocations, and round -1 below is not counted
    ratios, step = [], 0
    for i in range(-1, args.rounds):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            images, labels = next(batches)
            views = model.views(images, torch.Generator().manual_seed(step))
            trainer.train_step(model, opt, views, labels, r.optim.accum_steps, r.optim.grad_clip, dtype)
            step += 1
        per_step = (time.perf_counter() - t0) / args.steps
        t0 = time.perf_counter()
        probe(step, model)
        evaluation = time.perf_counter() - t0
        ratios += [evaluation / per_step] if i >= 0 else []
        print(f"round {i}: {per_step:.3f} s/step, evaluation {evaluation:.3f} s = {evaluation / per_step:.1f} steps"
              + (" (warm-up, not counted)" if i < 0 else ""))
    evals = r.optim.steps // r.run.monitor.every + 1
    mean = sum(ratios) / len(ratios)
    print(f"one evaluation = {mean:.1f} training steps (rounds {min(ratios):.1f}-{max(ratios):.1f}); "
          f"{evals} evaluations over {r.optim.steps} steps = {100 * evals * mean / r.optim.steps:.2f} % of pretraining "
          f"({100 * evals * max(ratios) / r.optim.steps:.2f} % at the worst round)")


if __name__ == "__main__":
    main()
