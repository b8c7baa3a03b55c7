"""benchmarks/determinism.py trains a recipe twice per setting of ``run.deterministic`` and counts the
weight tensors that differ: none on a CPU, whichever the setting; none with it on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO, env


def test_two_runs_compared_tensor_by_tensor(tmp_path) -> None:
    out = tmp_path / "determinism.json"
    proc = subprocess.run([sys.executable, "benchmarks/determinism.py", "simclr-resnet", "--out", str(out)],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = [(r["recipe"], r["deterministic"], r["tensors"]) for r in result["rows"]]
    assert rows == [("simclr-resnet", False, 62), ("simclr-resnet", True, 62)]  # 62: backbone and projection head
    same = [r for r in result["rows"] if r["deterministic"] or result["device"] == "cpu"]
    assert [(r["differ"], r["max_abs_diff"]) for r in same] == [(0, 0.0)] * len(same)
    assert proc.stdout.count("  0 of 62 weight tensors differ between two runs") == len(same)
