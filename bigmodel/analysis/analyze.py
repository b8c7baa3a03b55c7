"""The analysis behind ``bigmodel analyze``: what transferred, block by block.

A linear probe on every block of the pretrained backbone and of its random-init twin
(:mod:`bigmodel.analysis.layerwise`: accuracy against depth), and linear CKA between every pair of
blocks of the pretrained backbone and another one — the twin, another run's backbone of the same
architecture, or a copy fine-tuned on the task — on the task's test images
(:mod:`bigmodel.analysis.cka`: which layers does pretraining, or fine-tuning, change?). The files go
to ``out``: ``layerwise-<task>.json|png`` and ``cka-pretrained-vs-<b>.json|png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bigmodel.analysis import cka, layerwise
from bigmodel.architectures.base import Backbone
from bigmodel.data.base import TensorImages
from bigmodel.errors import RecipeError
from bigmodel.transfer.linear import Linear


def probe_and_compare(net: Backbone, twin: Backbone, train: TensorImages, test: TensorImages, *, task: str,
                      title: str, out: Path, provenance: dict[str, Any], batch_size: int,
                      dtype: torch.dtype | None, console: Console, other: Backbone | None = None,
                      other_label: str = "random_init", source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Probe every block of ``net`` and ``twin`` on ``task`` and compare the blocks of ``net`` with
    those of ``other`` (default: the twin, whose test features the probe computed already) by CKA.

    Args:
        title: the layer-wise figure's title.
        provenance: what the numbers were computed from (checkpoint, step, precision, task, ...);
            ``source`` adds what ``other`` is to the CKA file's.
        other: a backbone on the device the features are computed on, named ``other_label``.

    Returns:
        ``{"layerwise": ..., "cka": ..., "files": [json, png, json, png]}``.

    Raises:
        RecipeError: a task the probe cannot be fitted on (e.g. one class in the train split).
    """
    try:
        probed = layerwise.probe(net, twin, train, test, Linear(), batch_size, dtype, console)
    except ValueError as e:
        raise RecipeError(f"analyze on {task}: {e}") from None
    feats = probed.pop("features")
    lw = {**probed, "task": task, "provenance": provenance}
    lw_json = out / f"layerwise-{task}.json"
    out.mkdir(parents=True, exist_ok=True)
    lw_json.write_text(json.dumps(lw, indent=1, default=str))
    lw_png = layerwise.curve_png(probed["rows"], out / f"layerwise-{task}.png", title)
    # CKA on the test images' block features
    a_feats = [(n, te) for n, (_, te) in feats["pretrained"].items()]
    if other is None:
        b_feats = [(n, te) for n, (_, te) in feats["random_init"].items()]
    else:
        b_feats = layerwise.block_features(other, test, batch_size, dtype, console,
                                           f"block features test · {other_label}")
    sim = {**cka.matrix(a_feats, b_feats), "a": "pretrained", "b": other_label, "task": task, "images": len(test),
           "provenance": {**provenance, **(source or {})}}
    stem = f"cka-pretrained-vs-{other_label}"
    cka_json = out / f"{stem}.json"
    cka_json.write_text(json.dumps(sim, indent=1, default=str))
    cka_png = cka.heatmap_png(sim, out / f"{stem}.png", "pretrained", other_label,
                              f"linear CKA on {len(test)} {task} test images")
    console.print(table(lw["rows"], sim))
    files = [lw_json, lw_png, cka_json, cka_png]
    console.print("analysis: " + "  ".join(str(f) for f in files), highlight=False)
    return {"layerwise": lw, "cka": sim, "files": [str(f) for f in files]}


def table(rows: list[dict[str, Any]], sim: dict[str, Any]) -> Table:
    """One line per block: probe accuracy pretrained / twin, the raw-pixel probe (the same on every
    line: does the block beat its input?), and CKA with the other backbone's block at the same depth
    (the diagonal, where both have that block)."""
    t = Table(title=f"per-block linear probe · CKA vs {sim['b']} (same block)")
    for col in ("block", "pretrained %", "random-init %", "pixels %", f"CKA vs {sim['b']}"):
        t.add_column(col, justify="left" if col == "block" else "right")
    for i, r in enumerate(rows):
        diag = sim["cka"][i][i] if i < len(sim["cols"]) else None
        t.add_row(r["block"], f"{r['pretrained']:.2f}", f"{r['random_init']:.2f}", f"{r['pixels']:.2f}",
                  "" if diag is None else f"{diag:.3f}")
    return t
