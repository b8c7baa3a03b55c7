"""``report.json`` and a self-contained ``report.html`` for a run, built only from the run's files
(recipe.yaml, metrics.jsonl) and the summary handed over by the main job."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from bigmodel.train.logging import read_metrics


def write(run_dir: Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.json and report.html into ``run_dir``; returns their paths."""
    metrics = read_metrics(run_dir / "metrics.jsonl")
    report = {**summary, "curves": {"step": [m["step"] for m in metrics],
                                    "loss": [m["loss"] for m in metrics]}}
    json_path = run_dir / "report.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(json_path)
    html_path = run_dir / "report.html"
    html_path.write_text(_html(report, metrics))
    return json_path, html_path


def _loss_png(metrics: list[dict[str, Any]]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    ax.plot([m["step"] for m in metrics], [m["loss"] for m in metrics])
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _html(report: dict[str, Any], metrics: list[dict[str, Any]]) -> str:
    from bigmodel.transfer.suite import subjects_of, table_lines

    rows = report.get("transfer", [])
    subjects = subjects_of(rows)
    head = "".join(f"<th>{html.escape(s)}</th>" for s in subjects)
    body = "".join(
        "<tr><td>{}</td><td>{}</td>{}</tr>".format(
            html.escape(task), html.escape(protocol),
            "".join(f"<td>{html.escape(cells.get(s, '–'))}</td>" for s in subjects))
        for task, protocol, cells in table_lines(rows))
    curve = f'<img alt="loss curve" src="data:image/png;base64,{_loss_png(metrics)}">' if metrics else ""
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in report.get("model", {}).items())
    return f"""<!doctype html><meta charset="utf-8"><title>bigmodel report</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}</style>
<h1>bigmodel run report</h1>
<h2>Model</h2><table>{facts}</table>
<h2>Transfer (top-1 %, test split)</h2>
<table><tr><th>task</th><th>protocol</th>{head}</tr>{body}</table>
<h2>Pretraining loss</h2>{curve}
<h2>Recipe</h2><pre>{html.escape(json.dumps(report.get("recipe", {}), indent=1))}</pre>
"""
