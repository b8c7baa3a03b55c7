"""``report.json`` and a self-contained ``report.html`` for a run, built only from the run's files
(recipe.yaml, metrics.jsonl, figures/*.png, transfer/*.json, analysis/*.json|png) and the summary
handed over by the main job; :func:`rebuild` makes them again from the files alone."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from bigmodel.analysis import curves
from bigmodel.recipe import MonitorSpec
from bigmodel.train.metrics import read_metrics
from bigmodel.transfer.runner import subjects_of, table_lines
from bigmodel.transfer.suites import task_name

# Figures in the order report.html shows them; others under figures/ and analysis/ follow by name.
FIGURE_ORDER = ("curves", "confusion", "tsne", "attention", "gradcam", "reconstruction", "completions",
                "expert_load")


def figures(run_dir: Path) -> list[Path]:
    """The PNGs of ``run_dir/figures`` (in :data:`FIGURE_ORDER`, then by name), then those of
    ``run_dir/analysis``."""
    known = {n: i for i, n in enumerate(FIGURE_ORDER)}
    figs = sorted((run_dir / "figures").glob("*.png"), key=lambda p: (known.get(p.stem, len(known)), p.name))
    return figs + sorted((run_dir / "analysis").glob("*.png"))


def _json_files(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``{stem: content}`` of the readable ``*.json`` files in ``folder`` (``skip``: stems left out)."""
    out = {}
    for path in sorted(folder.glob("*.json")):
        if path.stem in skip:
            continue
        try:
            out[path.stem] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
    return out


def rebuild(run_dir: Path, model: dict[str, Any] | None = None, steps_done: int | None = None) -> tuple[Path, Path]:
    """report.json and report.html again from the run's files alone, without retraining or data:
    the previous report.json (the main job's transfer rows, FLOPs, timings), recipe.yaml, the
    metrics, ``transfer/*.json`` (``bigmodel transfer`` results), ``analysis/*.json`` and the
    figures. ``model`` / ``steps_done`` (from the checkpoint) replace the recorded ones."""
    import yaml

    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "report.json").read_text())
    except (OSError, ValueError):
        summary = {}
    for key in ("curves", "monitor", "transfer_files", "analysis", "figures"):
        summary.pop(key, None)
    if (run_dir / "recipe.yaml").is_file():
        summary["recipe"] = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    if steps_done is not None:
        summary.setdefault("pretrain", {})["steps_done"] = steps_done
    if model:
        summary["model"] = {**summary.get("model", {}), **model}
    return write(run_dir, summary)


def write(run_dir: Path, summary: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.json and report.html into ``run_dir``; returns their paths."""
    metrics = [m for m in read_metrics(run_dir / "metrics.jsonl") if "loss" in m]  # training records
    report = {**summary, "curves": {"step": [m["step"] for m in metrics],
                                    "loss": [m["loss"] for m in metrics],
                                    "lr": [m.get("lr") for m in metrics]}}
    monitor = curves.monitor(read_metrics(run_dir / "metrics.jsonl"),
                             summary.get("model", {}).get("train_gflops_per_step"))
    if monitor:
        report["monitor"] = {**monitor_settings(summary.get("recipe", {})), **monitor}
    extra = _json_files(run_dir / "transfer", skip=("partial",))
    if extra:
        report["transfer_files"] = extra
    analysis = _json_files(run_dir / "analysis")
    if analysis:
        report["analysis"] = analysis
    report["figures"] = [str(p.relative_to(run_dir)) for p in figures(run_dir)]
    json_path = run_dir / "report.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(json_path)
    html_path = run_dir / "report.html"
    html_path.write_text(_html(report, metrics, figures(run_dir)))
    return json_path, html_path


def monitor_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """``task`` (its short name), ``protocol``, ``every``, ``limit`` (defaults filled in) and the
    protocol's keys of a raw recipe's ``run.monitor``."""
    spec = dict(((recipe or {}).get("run") or {}).get("monitor") or {})
    task = spec.pop("task", None)
    name = task_name(task.get("name"), task) if isinstance(task, dict) else task
    return {"task": name, **{k: MonitorSpec.model_fields[k].default for k in ("every", "limit")}, **spec}


def _monitor_html(section: dict[str, Any] | None) -> str:
    if not section:
        return ""
    where = f"{section['task']} · {section['protocol']}"
    png = base64.b64encode(curves.monitor_png(section, f"{where}: transfer during pretraining")).decode()
    subset = "every image" if section.get("limit") is None else f"at most {section['limit']} images"
    return (f"<h2>Transfer during pretraining (run.monitor)</h2><p>{html.escape(where)}: top-1 % on a fixed subset "
            f"({html.escape(subset)} of each split) every {html.escape(str(section.get('every')))} steps; step 0 "
            f"is the random initialisation.</p>"
            f'<img alt="monitor curve" src="data:image/png;base64,{png}">')


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


def _table(rows: list[dict[str, Any]]) -> str:
    subjects = subjects_of(rows)
    head = "".join(f"<th>{html.escape(s)}</th>" for s in subjects)
    body = "".join(
        "<tr><td>{}</td><td>{}</td>{}</tr>".format(
            html.escape(task), html.escape(protocol),
            "".join(f"<td>{html.escape(cells.get(s, '–'))}</td>" for s in subjects))
        for task, protocol, cells in table_lines(rows))
    return f"<table><tr><th>task</th><th>protocol</th>{head}</tr>{body}</table>"


def _safe_table(rows: Any) -> str:
    """:func:`_table` of rows read from a file, or a note when they are not transfer rows."""
    try:
        return _table(rows)
    except (KeyError, TypeError, AttributeError, ValueError):
        return "<p>(rows in an unknown layout; see report.json)</p>"


FIGURE_TITLES = {"curves": "Loss and learning rate",
                 "confusion": "Confusion matrix (linear probe, first transfer task)",
                 "tsne": "Frozen test features (t-SNE): pretrained vs random init", "attention": "Attention rollout",
                 "gradcam": "Grad-CAM", "reconstruction": "MAE reconstructions",
                 "completions": "Completions and samples", "expert_load": "Expert load"}


def _figures_html(paths: list[Path]) -> str:
    parts = []
    for p in paths:
        title = FIGURE_TITLES.get(p.stem, p.stem.replace("_", " "))
        data = base64.b64encode(p.read_bytes()).decode()
        parts.append(f'<figure><figcaption>{html.escape(title)} <small>({html.escape(p.parent.name)}/'
                     f'{html.escape(p.name)})</small></figcaption><img alt="{html.escape(title)}" '
                     f'src="data:image/png;base64,{data}"></figure>')
    return "".join(parts)


def _html(report: dict[str, Any], metrics: list[dict[str, Any]], figs: list[Path] = ()) -> str:
    rows = report.get("transfer", [])
    extra = "".join(
        f"<h3>{html.escape(name)}.json</h3>"
        f"<p><small>{html.escape(json.dumps(content.get('provenance', {}), default=str))}</small></p>"
        f"{_safe_table(content.get('transfer', []))}"
        for name, content in report.get("transfer_files", {}).items() if isinstance(content, dict))
    extra = f"<h2>Other transfer results (transfer/*.json)</h2>{extra}" if extra else ""
    has_curves = any(p.stem == "curves" for p in figs)
    curve = (f'<h2>Pretraining loss</h2><img alt="loss curve" src="data:image/png;base64,{_loss_png(metrics)}">'
             if metrics and not has_curves else "")
    figures_html = f"<h2>Figures</h2>{_figures_html(list(figs))}" if figs else ""
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                    for k, v in report.get("model", {}).items())
    return f"""<!doctype html><meta charset="utf-8"><title>bigmodel report</title>
<style>body{{font-family:sans-serif;max-width:68em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}figure{{margin:1.5em 0}}
figcaption{{font-weight:bold;margin-bottom:.4em}}figure img{{max-width:100%;height:auto}}</style>
<h1>bigmodel run report</h1>
<h2>Model</h2><table>{facts}</table>
<h2>Transfer (top-1 %, test split)</h2>
{_table(rows)}
{extra}
{_monitor_html(report.get("monitor"))}
{curve}
{figures_html}
<h2>Recipe</h2><pre>{html.escape(json.dumps(report.get("recipe", {}), indent=1))}</pre>
"""
