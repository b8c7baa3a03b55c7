"""Loss and learning-rate curves of a run, from its ``metrics.jsonl`` (the trainer draws nothing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of the records that hold ``key``, in logged order."""
    rows = [(m["step"], m[key]) for m in metrics if key in m and "step" in m]
    return [s for s, _ in rows], [float(v) for _, v in rows]


def make(metrics: list[dict[str, Any]], out: Path) -> Path | None:
    """Training loss (left) and learning rate (right) against step, written to ``out/curves.png``;
    ``None`` when no record holds a loss."""
    steps, loss = series(metrics, "loss")
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lr_steps, lr = series(metrics, "lr")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=100)
    axes[0].plot(steps, loss, marker="." if len(steps) < 30 else None, color="tab:blue")
    axes[0].set(xlabel="step", ylabel="training loss", title="Pretraining loss")
    if lr_steps:
        axes[1].plot(lr_steps, lr, marker="." if len(lr_steps) < 30 else None, color="tab:orange")
        axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    else:
        axes[1].text(0.5, 0.5, "no learning rate logged", ha="center", va="center", transform=axes[1].transAxes)
    axes[1].set(xlabel="step", ylabel="learning rate", title="Learning-rate schedule")
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = Path(out) / "curves.png"
    fig.savefig(path)
    plt.close(fig)
    return path
