"""Learning evidence (issue 3): pretrain self-supervised recipes on MNIST for a bounded time and
compare the linear probe of the pretrained backbone with its random-init twin.

    python benchmarks/learning_evidence.py                       # runs simclr-resnet, mae-vit, igpt
    python benchmarks/learning_evidence.py --collect runs/le/*   # only tabulate finished runs

Each recipe runs through `bigmodel run` (its own transfer section: linear + kNN on MNIST), into
runs/learning-evidence/<recipe>; the table is written to benchmarks/results/learning_evidence.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RECIPES = ["simclr-resnet", "mae-vit", "igpt"]
OUT = Path("runs/learning-evidence")
TABLE = Path("benchmarks/results/learning_evidence.md")


def row(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    out = {"recipe": run_dir.name, "pretrain_s": report["pretrain"]["seconds"]}
    for r in report.get("transfer", []):
        for subject, res in r["results"].items():
            out[f"{r['protocol']}/{subject}"] = res["top1"]
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| recipe | pretrain s | linear pretrained | linear random init | gain | kNN pretrained "
             "| kNN random init |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lp, lr = r.get("linear/pretrained", float("nan")), r.get("linear/random_init", float("nan"))
        lines.append(f"| {r['recipe']} | {r['pretrain_s']:.0f} | {lp:.2f} | {lr:.2f} | {lp - lr:+.2f} | "
                     f"{r.get('knn/pretrained', float('nan')):.2f} | {r.get('knn/random_init', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="*", default=RECIPES)
    p.add_argument("--collect", nargs="*", type=Path, help="tabulate these finished run directories")
    args = p.parse_args()
    dirs = args.collect
    if dirs is None:
        dirs = []
        for name in args.recipes:
            out = OUT / name
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "bigmodel", "run", name, f"run.out={out}"], check=True)
            print(f"{name}: {time.perf_counter() - t0:.0f}s")
            dirs.append(out)
    text = markdown([row(d) for d in dirs])
    TABLE.parent.mkdir(parents=True, exist_ok=True)
    TABLE.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
