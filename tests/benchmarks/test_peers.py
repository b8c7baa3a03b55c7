"""benchmarks/peers.py and benchmarks/gpu.sh run end to end at tiny sizes and write what they say.

The figures themselves are timings, never asserted; what is checked is the shape of the record and
its arithmetic: each round's ratio is ours / peer of that round's recorded images/s, the row's ratio
their median, the achieved GFLOP/s the counted FLOPs over the recorded step time.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigmodel.train import precision

REPO = Path(__file__).resolve().parents[2]
SIDE_KEYS = {"images_per_s", "step_s", "steps", "peak_rss_mb", "base_rss_mb", "built_rss_mb", "autocast",
             "gflop_per_step", "gflops", "matmul_share_fp32", "matmul_share_bf16"}


@pytest.mark.slow
def test_peers_tiny_run_records_both_sides_and_their_ratio(tmp_path) -> None:
    """Four processes (ours and the peer, two rounds), each a few seconds of imports."""
    out = tmp_path / "peers"
    proc = subprocess.run([sys.executable, "benchmarks/peers.py", "--tiny", "--rows", "vit", "--precisions", "auto",
                           "--rounds", "2", "--steps", "1", "--warmup", "1", "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert {"machine", "settings", "matmul_gflops", "matmul_gflops_per_round", "rows"} <= result.keys()
    assert result["machine"]["threads"] == 1 and result["settings"]["rounds"] == 2
    assert all(len(v) == 2 and min(v) > 0 for v in result["matmul_gflops_per_round"].values())
    rows = result["rows"]
    assert [(r["row"], r["precision"]) for r in rows] == [("vit", "auto")]
    for row in rows:
        assert len(row["rounds"]) == 2 and row["target"] == 1.0 and row["met"] == (row["ratio"] >= 1.0)
        for rnd in row["rounds"]:
            ours, peer = rnd["ours"], rnd["peer"]
            assert SIDE_KEYS <= ours.keys() and SIDE_KEYS <= peer.keys()
            assert rnd["ratio"] == pytest.approx(ours["images_per_s"] / peer["images_per_s"], rel=1e-3)
            for side in (ours, peer):
                assert side["peak_rss_mb"] >= side["base_rss_mb"] > 0 and side["steps"] == 1
                assert side["gflops"] == pytest.approx(side["gflop_per_step"] / side["step_s"], rel=2e-3)
                assert side["images_per_s"] == pytest.approx(8 / side["step_s"], rel=2e-3)  # tiny batch: 8
        assert row["ratio_per_round"] == [rnd["ratio"] for rnd in row["rounds"]]
        assert row["ratio"] == pytest.approx(statistics.median(row["ratio_per_round"]), rel=1e-3)
        assert row["ours"]["gflop_per_step"] == pytest.approx(row["peer"]["gflop_per_step"], rel=0.05)  # same model
    auto, = rows  # ours: the trainer's choice under run.precision=auto; the peer: its default, fp32
    rule = precision.autocast_dtype("auto", torch.device("cpu"))
    assert auto["peer"]["autocast"] == "fp32" and auto["ours"]["autocast"] == ("bf16" if rule else "fp32")
    table = out.with_suffix(".md").read_text()
    assert f"| supervised ViT | auto: {auto['ours']['autocast']} / fp32 |" in table and f"{auto['ratio']:.2f}×" in table


def test_peers_refuses_unknown_rows() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/peers.py", "--rows", "vit,nope"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown: nope" in proc.stderr


@pytest.mark.slow
def test_gpu_script_tiny_on_the_cpu(tmp_path) -> None:
    """The GPU script's --tiny mode: both rows through bf16 + compile (aot_eager) on the CPU."""
    out = tmp_path / "gpu.json"
    proc = subprocess.run(["bash", "benchmarks/gpu.sh", "--tiny", "--peak-tflops", "1", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tiny"] and result["compile"] and result["device"] == "cpu"
    assert set(result["rows"]) == {"mae-vit-b16", "supervised-vit-b16"}
    for row in result["rows"].values():
        assert row["autocast"] == "bfloat16" and row["images_per_s"] > 0 and row["gflop_per_step"] > 0
        assert row["views_s"] >= 0 and row["host_views_s"] >= 0 and row["warmup_s"] >= 0
        assert row["mfu"] == pytest.approx(row["tflops"], abs=0.01)  # against a 1 TFLOP/s peak
