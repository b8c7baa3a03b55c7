"""Data-parallel scaling: training images/s of one recipe on 1, 2, ... processes (torchrun, DDP).

    python benchmarks/ddp_scaling.py [RECIPE] [--procs 1 2] [--steps 60] [--threads 1] [key=value ...]

Each process count runs ``torchrun --standalone --nproc-per-node N`` on this script's worker, which
pretrains RECIPE as ``bigmodel pretrain`` does (build, run directory, trainer.pretrain; without the
report that follows) into a fresh temporary run directory, with the same global batch (the
recipe's), the same schedule and logging every step; rank 0's ``metrics.jsonl`` gives the global images/s of every
step (all ranks' images over the step's wall time). The first ``--warmup`` steps (start-up, first
allocations) are left out and the median of the rest is reported, with the speed-up over one
process and the efficiency (speed-up / N).

On GPUs each process takes one (``LOCAL_RANK``); on a CPU the processes share its cores: give each
``--threads`` intra-op threads so that N × threads does not exceed the cores (on 2 cores, 2
processes of 1 thread against 1 process of 1 or 2 threads; every rank also augments the whole
global batch, see bigmodel.train.distributed.rank_views, so a CPU-bound tiny recipe scales less
than its forward/backward would). Run it on an otherwise idle machine: the figures are
wall-clock rates. Prints a table and writes JSON to ``--out``.

Default recipe: the quick-start in tiny mode with a larger batch (128) and more steps, fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["fractals-vit", "run.tiny=true", "optim.batch_size=128", "run.precision=fp32", "data.images_per_class=64"]


def measure(recipe: list[str], procs: int, steps: int, threads: int, warmup: int) -> dict:
    """Median global images/s of one pretraining run on ``procs`` processes."""
    with tempfile.TemporaryDirectory(prefix=f"ddp-scaling-{procs}-") as tmp:
        run_dir = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
               __file__, "--worker", *recipe, f"optim.steps={steps}", "run.log_every=1",
               f"run.checkpoint_every={steps}", f"run.out={run_dir}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{procs} processes failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rates = [r["images_per_s"] for r in records if r["step"] > warmup]
    return {"procs": procs, "threads_per_proc": threads, "steps_measured": len(rates),
            "images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates)}


def worker(args: list[str]) -> None:
    """One rank of a measured run: pretraining only, in the process group torchrun describes."""
    from rich.console import Console

    from bigmodel.commands.pretrain import pretrain
    from bigmodel.recipe import resolve
    from bigmodel.train import build, distributed
    from bigmodel.train.run_dir import open_run

    recipe = resolve(args[0], args[1:])
    with distributed.session():
        data, model = build.experiment(recipe)
        with open_run(recipe, Console(quiet=True)) as run_dir:
            pretrain(recipe, run_dir, data, model, Console(quiet=True))


def main() -> None:
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", nargs="*",
                   help="zoo name or YAML file, then key=value overrides (default: tiny fractals-vit)")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="steps left out at the start")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (CPU)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ddp_scaling.json")
    args = p.parse_args()
    recipe = args.recipe or DEFAULT
    rows = [measure(recipe, n, args.steps, args.threads, args.warmup) for n in args.procs]
    base = rows[0]["images_per_s"] / rows[0]["procs"]  # per-process rate of the smallest count
    print(f"{'procs':>5}  {'images/s':>10}  {'speed-up':>8}  {'efficiency':>10}")
    for r in rows:
        r["speed_up"] = r["images_per_s"] / rows[0]["images_per_s"]
        r["efficiency"] = r["images_per_s"] / (base * r["procs"])
        print(f"{r['procs']:>5}  {r['images_per_s']:>10.1f}  {r['speed_up']:>8.2f}  {r['efficiency']:>10.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"recipe": recipe, "rows": rows, "cpu_count": os.cpu_count()}, indent=1))
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
