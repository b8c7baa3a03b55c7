"""Curves of a run from its ``metrics.jsonl`` (the trainer draws nothing): loss and learning rate,
and the ``run.monitor`` probe's accuracy against pretraining steps and FLOPs."""

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


def monitor(metrics: list[dict[str, Any]], gflops_per_step: float | None = None) -> dict[str, Any] | None:
    """report.json's ``monitor``: the ``run.monitor`` probe's ``top1`` (%) and ``seconds`` by ``step``
    and, with the training FLOPs of one step (report.json's ``train_gflops_per_step``), by
    ``pretrain_flops`` (forward and backward of every step so far; the probe's own are not counted).
    ``None`` when no record holds a monitor value."""
    steps, top1 = series(metrics, "monitor_top1")
    if not steps:
        return None
    out: dict[str, Any] = {"step": steps, "top1": top1, "seconds": series(metrics, "monitor_s")[1]}
    pixels = series(metrics, "monitor_top1_pixels")[1]
    if pixels:  # the same probe on raw pixels, taken with the step-0 value
        out["pixels_top1"] = pixels[0]
    if gflops_per_step:
        out["pretrain_flops"] = [s * gflops_per_step * 1e9 for s in steps]
    return out


def monitor_png(section: dict[str, Any], title: str) -> bytes:
    """The probe's top-1 against pretraining steps (left) and FLOPs (right) as PNG bytes, the step-0
    value (random init) and the raw-pixel score drawn across both as dashed baselines."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), dpi=100)
    xs = (("step", section["step"], "pretraining step"),
          ("flops", section.get("pretrain_flops"), "pretraining FLOPs (forward + backward)"))
    for ax, (_, x, label) in zip(axes, xs, strict=True):
        if x is None:
            ax.text(0.5, 0.5, "FLOPs not counted for this run", ha="center", va="center", transform=ax.transAxes)
        else:
            ax.plot(x, section["top1"], marker="o", markersize=3, color="tab:green")
            ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        baselines = []
        if section["step"][0] == 0:
            baselines.append((section["top1"][0], dict(color="grey", linestyle="--", label="random init (step 0)")))
        if "pixels_top1" in section:
            baselines.append((section["pixels_top1"], dict(color="tab:blue", linestyle=":", label="raw pixels")))
        for y, style in baselines:
            ax.axhline(y, linewidth=1, **style)
        if baselines:  # axhline leaves the y-range alone: put the baselines in the data limits, then autoscale
            ax.update_datalim([(0.0, y) for y, _ in baselines], updatex=False)
            ax.autoscale_view(scalex=False)
            ax.legend(loc="lower right", fontsize=8)
        ax.set(xlabel=label, ylabel="top-1 %")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
