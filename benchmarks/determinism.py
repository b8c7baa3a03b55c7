"""Do two runs of one recipe give the same weights, with and without ``run.deterministic``?

    python benchmarks/determinism.py [RECIPE ...] [--out FILE]

Each RECIPE (default: the four that tests/train/test_resume.py stops and resumes) trains in its tiny
mode, fp32, on MNIST-layout digits generated from scikit-learn's (no data folder needed), twice from
the same seed for each setting of ``run.deterministic``, on this machine's device. Prints, per recipe
and setting, how many weight tensors differ between the two runs, the largest difference, and the
seconds of a run. On a CPU both settings give identical runs. On a GPU the kernels that accumulate with
atomics sum in a varying order, so without ``run.deterministic`` the runs (and a stopped-and-resumed
run against an unbroken one) differ in the last bits. Figures: benchmarks/results/gpu.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from safetensors.torch import load_file

from bigmodel import api
from bigmodel.recipe import RunConfig, resolve
from bigmodel.train import build, checkpoint
from tests.conftest import synthetic_mnist


def weights(name: str, data: Path, out: Path, deterministic: bool) -> tuple[dict[str, torch.Tensor], float]:
    recipe = resolve(name, ["run.tiny=true", "run.precision=fp32", f"data.path={data}", f"run.out={out}",
                            "run.figures=false", f"run.deterministic={str(deterministic).lower()}"])
    t0 = time.perf_counter()
    api.run_pipeline(recipe, Console(quiet=True), transfer=False)
    return load_file(str(checkpoint.latest(out / "checkpoints") / "model.safetensors")), time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", default=["mae-vit", "simclr-resnet", "igpt", "mae-vit-moe"])
    parser.add_argument("--out", help="write the rows as JSON here too")
    args = parser.parse_args()
    dev = build.device(RunConfig())
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "mnist.npz"
        np.savez(data, **synthetic_mnist())
        for name in args.recipes:
            for deterministic in (False, True):
                (a, seconds), (b, _) = (weights(name, data, Path(tmp) / f"{name}-{deterministic}-{i}", deterministic)
                                        for i in range(2))
                differ = [k for k in a if not torch.equal(a[k], b[k])]
                largest = max((float((a[k].double() - b[k].double()).abs().max()) for k in differ), default=0.0)
                rows.append({"recipe": name, "deterministic": deterministic, "tensors": len(a),
                             "differ": len(differ), "max_abs_diff": largest, "run_s": round(seconds, 2)})
                print(f"{name:<14} {where}  run.deterministic={str(deterministic).lower():<5}  "
                      f"{len(differ):3d} of {len(a)} weight tensors differ between two runs "
                      f"(largest difference {largest:.3g}; a run {seconds:.1f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": where, "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
