"""Ensembles of fine-tuned members — the "many small models combined" of the big-model idea.

Each member backbone is fine-tuned on the task by the ``finetune`` protocol (BiT-HyperRule unless
overridden; the framework's training loop, with its progress line, checkpoints in the protocol's
``checkpoint_dir`` and resume), member ``i`` with seed ``seed + i`` (so one checkpoint listed twice still gives two
different members); the ensemble predicts the mean of the members' softmax probabilities
(Lakshminarayanan et al., 2017). Reported on the test split: top-1 and negative log-likelihood of
every member and of the ensemble, the ensemble's gain over its best member, and the pairwise
disagreement of the members (the share of test images on which two members predict different
classes: an ensemble can only gain where its members disagree).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bigmodel.architectures.base import Backbone
from bigmodel.data.base import TensorImages
from bigmodel.transfer.finetune import Finetune


def scores(probs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Top-1 (%) and mean negative log-likelihood of class probabilities ``(N, C)``."""
    nll = -probs.gather(1, targets[:, None]).clamp_min(1e-12).log().mean()
    return {"top1": 100.0 * (probs.argmax(1) == targets).float().mean().item(), "nll": nll.item()}


def ensemble(members: Sequence[tuple[str, Backbone]], train: TensorImages, test: TensorImages,
             protocol: Finetune | None = None, console: Console | None = None) -> dict[str, Any]:
    """Fine-tune every ``(name, backbone)`` member on ``train``; score members and their
    probability-mean ensemble on ``test``."""
    if not members:
        raise ValueError("ensemble: no members")
    protocol = protocol or Finetune()
    console = console or Console()
    probs, rows = [], []
    for i, (name, net) in enumerate(members):
        t0 = time.perf_counter()
        model, schedule = protocol.fit(net, train, seed=protocol.seed + i, console=console)
        p = protocol.predict_proba(model, test)
        del model
        rows.append({"member": name, "seed": protocol.seed + i, **scores(p, test.targets),
                     "schedule": schedule.as_dict(), "seconds": round(time.perf_counter() - t0, 2)})
        probs.append(p)
        console.print(f"  member {i} ({name}): top-1 {rows[-1]['top1']:.2f}%", highlight=False)
    combined = scores(torch.stack(probs).mean(0), test.targets)
    best = max(r["top1"] for r in rows)
    preds = [p.argmax(1) for p in probs]
    disagreement = [[100.0 * (a != b).float().mean().item() for b in preds] for a in preds]
    console.print(f"  ensemble of {len(rows)}: top-1 {combined['top1']:.2f}% (best member {best:.2f}%)",
                  highlight=False)
    return {"protocol": "finetune", "settings": protocol.settings(), "combine": "mean of softmax probabilities",
            "n_train": len(train), "n_test": len(test), "members": rows,
            "ensemble": {**combined, "size": len(rows)}, "best_member_top1": best,
            "gain_over_best": combined["top1"] - best,
            "mean_member_top1": sum(r["top1"] for r in rows) / len(rows),
            "disagreement": disagreement}  # % of test images on which members i and j differ


def table(result: dict[str, Any], title: str = "ensemble (test split)") -> Table:
    t = Table(title=title)
    for col in ("model", "top-1 %", "NLL"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for i, r in enumerate(result["members"]):
        t.add_row(f"member {i}: {r['member']}", f"{r['top1']:.2f}", f"{r['nll']:.3f}")
    e = result["ensemble"]
    t.add_row(f"ensemble ({e['size']}, mean prob.)", f"{e['top1']:.2f}", f"{e['nll']:.3f}", style="bold")
    d = result.get("disagreement")
    if d is not None and len(d) > 1:
        pairs = [d[i][j] for i in range(len(d)) for j in range(i + 1, len(d))]
        t.caption = (f"gain over the best member {result['gain_over_best']:+.2f} points; members disagree on "
                     f"{sum(pairs) / len(pairs):.2f}% of test images on average")
    return t
