"""Record the golden losses of the zoo recipes' tiny runs into tests/recipes/golden_losses.json.

Rerun it when an objective, augmentation, architecture or data pipeline changes ON PURPOSE, and say
in the commit message why the losses moved (tests/recipes/test_golden.py explains the check):

    .venv/bin/python benchmarks/record_golden.py              # every zoo recipe (seconds each)
    .venv/bin/python benchmarks/record_golden.py mae-vit igpt # only these; the others are kept

Each recipe is pretrained exactly as the tests run it (the overrides of ``golden_overrides``: tiny
mode, fp32, a log line per step; one thread), from the repository root so that the recipes'
relative data paths resolve, in a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from bigmodel import api  # noqa: E402
from bigmodel.recipe import resolve, zoo_names  # noqa: E402
from tests.recipes.test_golden import GOLDEN_FILE, golden_overrides, recorded  # noqa: E402

ABOUT = ("Per-step pretraining losses (and MoE aux losses) of each zoo recipe's tiny run "
         "(tests/recipes/test_golden.py). "
         "Written by benchmarks/record_golden.py: rerun it when a change moves them on purpose, "
         "and say why in the commit.")


def record(name: str, folder: Path) -> dict[str, dict[str, float]]:
    """Pretrain ``name``'s golden run in ``folder``; its ``{"loss": {step: loss}, ...}``."""
    out = folder / name
    api.run_pipeline(resolve(name, golden_overrides(out)), Console(quiet=True), transfer=False)
    return recorded(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"recipes to rerun (default: all of {', '.join(zoo_names())})")
    args = p.parse_args()
    unknown = sorted(set(args.names) - set(zoo_names()))
    if unknown:
        p.error(f"not zoo recipes: {', '.join(unknown)}; zoo: {', '.join(zoo_names())}")
    torch.set_num_threads(1)  # as tests/conftest.py: the thread count can change float reductions
    os.chdir(REPO)
    old = json.loads(GOLDEN_FILE.read_text())["recipes"] if GOLDEN_FILE.exists() else {}
    recipes = {n: v for n, v in old.items() if n in zoo_names()}
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        for name in args.names or zoo_names():
            recipes[name] = record(name, Path(tmp))
            moved = "" if name not in old else ("  (unchanged)" if old[name] == recipes[name] else "  (moved)")
            print(f"{name:<20} " + " ".join(f"{v:.6g}" for v in recipes[name]["loss"].values()) + moved, flush=True)
    payload = {"about": ABOUT, "torch": torch.__version__, "overrides": golden_overrides("RUN"),
               "recipes": dict(sorted(recipes.items()))}
    GOLDEN_FILE.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {GOLDEN_FILE.relative_to(REPO)}")


if __name__ == "__main__":
    main()
