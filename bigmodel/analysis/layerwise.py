"""Layer-wise transfer: a linear probe on the pooled features of every block, pretrained beside
its random-init twin, as a curve of accuracy against depth.

Where the curve of the pretrained backbone peaks says where its transferable features are (ImageGPT,
Chen et al., 2020, found them in the middle of its generative models); the gap to the twin at each
depth says what pretraining added there; the same probe on the raw pixels (the input every block
starts from) says whether a block has anything the input had not. The probe is the project's linear
protocol (:class:`bigmodel.transfer.linear.Linear`, C chosen on a validation split of the training
images for every block and subject alike); features come from
:meth:`~bigmodel.architectures.base.Backbone.block_features`, the one interface every family has.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from bigmodel.architectures.base import Backbone
from bigmodel.data.base import TensorImages
from bigmodel.data.transforms import to_input
from bigmodel.transfer.base import ImageProgress, pixels
from bigmodel.transfer.linear import Linear


@torch.inference_mode()
def block_features(net: Backbone, data: TensorImages, batch_size: int = 256, dtype: torch.dtype | None = None,
                   console: Console | None = None, label: str = "block features") -> list[tuple[str, torch.Tensor]]:
    """Every block's pooled features of every image: ``[(block name, (N, D_i) float32 CPU), ...]``,
    backbone in eval mode (as :func:`bigmodel.transfer.base.features`, one tensor per block)."""
    was_training = net.training
    net.eval()
    dev = next(net.parameters()).device
    names: list[str] = []
    parts: list[list[torch.Tensor]] = []
    with ImageProgress(console, len(data), label) as progress:
        for i in range(0, len(data), batch_size):
            x = to_input(data.images[i:i + batch_size], net.image_size, net.in_chans).to(dev)
            with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                blocks = net.block_features(x)
            if not names:
                names = [n for n, _ in blocks]
                parts = [[] for _ in blocks]
            for part, (_, f) in zip(parts, blocks, strict=True):
                part.append(f.float().cpu())
            progress.update(min(i + batch_size, len(data)))
    net.train(was_training)
    return [(n, torch.cat(p)) for n, p in zip(names, parts, strict=True)]


def probe(net: Backbone, twin: Backbone | None, train: TensorImages, test: TensorImages,
          protocol: Linear | None = None, batch_size: int = 256, dtype: torch.dtype | None = None,
          console: Console | None = None) -> dict[str, Any]:
    """A linear probe on every block's features of ``net`` and of its random-init ``twin``.

    Args:
        net: the pretrained backbone.
        twin: the same architecture untrained (``None``: the pretrained column only).
        train, test: the task's splits (labelled).
        protocol: the linear probe (default settings if ``None``).

    Returns:
        ``{"rows": [{"block", "depth", "pretrained", "random_init", "pixels", "C"}, ...],
        "pixels": {"top1", "C", "features"}, "protocol": settings, "features": {"pretrained":
        {block: [train, test] feature tensors}, "random_init": ...}}``; ``depth`` counts blocks from
        1, accuracies are top-1 % on ``test``; ``pixels`` is the probe on the raw images (``C·H·W``
        features, the transfer suite's pixel subject), the same in every row (the input has no
        depth); ``C`` is the probe's C per column. The features are kept for CKA
        (:mod:`bigmodel.analysis.cka`) and are not meant for JSON.
    """
    protocol = protocol or Linear()
    protocol.check(train.targets)
    subjects = {"pretrained": net, **({"random_init": twin} if twin is not None else {})}
    feats: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
    for who, backbone in subjects.items():
        tr = block_features(backbone, train, batch_size, dtype, console, f"block features train · {who}")
        te = block_features(backbone, test, batch_size, dtype, console, f"block features test · {who}")
        feats[who] = [(n, a, b) for (n, a), (_, b) in zip(tr, te, strict=True)]
    px_train = pixels(train)
    px = protocol.fit_score(px_train, train.targets, pixels(test), test.targets)
    baseline = {"top1": round(px["top1"], 4), "C": px["C"], "features": px_train.shape[1]}
    rows = []
    for depth, (name, *_) in enumerate(feats["pretrained"], 1):
        row: dict[str, Any] = {"block": name, "depth": depth}
        chosen = {}
        for who, blocks in feats.items():
            _, xtr, xte = blocks[depth - 1]
            res = protocol.fit_score(xtr, train.targets, xte, test.targets)
            row[who], chosen[who] = round(res["top1"], 4), res["C"]
        row["pixels"] = baseline["top1"]
        row["C"] = {**chosen, "pixels": baseline["C"]}
        rows.append(row)
    return {"rows": rows, "pixels": baseline, "protocol": {"name": "linear", **protocol.settings()},
            "features": {who: {n: (a, b) for n, a, b in blocks} for who, blocks in feats.items()}}


def curve_figure(rows: list[dict[str, Any]], title: str) -> Any:
    """The figure of :func:`curve_png` (a matplotlib ``Figure``; the caller closes it): accuracy
    against depth, one line per column present (pretrained, random_init), the raw-pixel probe as a
    horizontal reference line, block names on the x axis. A title wider than the figure is wrapped
    at word boundaries until every line fits (measured with the figure's own renderer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depth = [r["depth"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.45 * len(rows) + 3), 3.8))
    for who, style in (("pretrained", "o-"), ("random_init", "s--")):
        if rows and who in rows[0]:
            ax.plot(depth, [r[who] for r in rows], style, label=who.replace("_", "-"))
    if rows and "pixels" in rows[0]:
        ax.axhline(rows[0]["pixels"], color="0.35", linestyle=":", linewidth=1.5,
                   label=f"raw pixels ({rows[0]['pixels']:.1f})")
    ax.set_xticks(depth, [r["block"] for r in rows], rotation=45 if len(rows) > 8 else 0,
                  ha="right" if len(rows) > 8 else "center")
    ax.set_xlabel("block (shallow → deep)")
    ax.set_ylabel("linear probe top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    _fit_title(fig, ax, title)
    return fig


def _fit_title(fig: Any, ax: Any, title: str) -> None:
    """Set ``title``, wrapped to fewer characters per line until it lies inside the figure; a
    parenthesis (``(60 train / 60 test)``) stays on one line where it fits."""
    title = re.sub(r"\([^)]*\)", lambda m: m.group(0).replace(" ", "\u00a0"), title)
    width = len(title)
    while True:
        ax.set_title(textwrap.fill(title, width) if width < len(title) else title)
        fig.tight_layout()
        renderer = fig.canvas.get_renderer()
        box, frame = ax.title.get_window_extent(renderer), fig.bbox
        if (box.x0 >= frame.x0 and box.x1 <= frame.x1) or width <= 10:
            return
        centre = (box.x0 + box.x1) / 2  # the title is centred over the axes, not the figure
        room = 2 * min(centre - frame.x0, frame.x1 - centre)
        width = max(10, min(width - 1, int(width * room / box.width)))


def curve_png(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """:func:`curve_figure` written to ``path`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = curve_figure(rows, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
