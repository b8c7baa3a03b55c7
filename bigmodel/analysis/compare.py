"""Across runs: one table and plots over several run directories (``bigmodel compare RUN_DIR...``).

Built only from each run's files: ``report.json`` (recipe, model size, FLOPs, steps done, transfer
rows) and any ``transfer/*.json`` written by ``bigmodel transfer`` (rows the report lacks). One row
per run: run, architecture, objective, data, backbone parameters, pretraining GFLOPs actually spent
(``train_gflops_per_step × steps_done``), and per column the pretrained backbone's top-1 and its
gap over the random-init twin (points; absent when the twin was not scored). A column is one task ·
protocol at one setting: rows that differ in any setting (kNN's k, a fine-tune's schedule) are
separate columns, labelled with the settings that differ (:func:`column_labels`).

Plots: accuracy per protocol (grouped bars, one bar per run, the twin as a black tick), and
accuracy against pretraining compute and against parameters (log x). Where a column has at least
:data:`MIN_FIT_POINTS` runs, a power law ``error = a · x^(-b)`` with ``error = 100 - top-1`` is fitted
by least squares in log-log space (:func:`power_law`), drawn, and saved in ``compare.json``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from bigmodel.recipe import RecipeError
from bigmodel.transfer.runner import protocol_label, task_label
from bigmodel.transfer.suites import task_name

MIN_FIT_POINTS = 4
PRETRAINED, TWIN = "pretrained", "random_init"


def power_law(x: Any, error: Any) -> dict[str, float]:
    """Least-squares fit of ``log error = log a - b · log x``; returns ``{"a", "b", "r2", "n"}``.

    Args:
        x: positive abscissae (compute in GFLOPs, or parameters), shape ``(n,)``.
        error: positive errors (``100 - top-1`` in %), shape ``(n,)``.
    """
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(error, dtype=np.float64))
    design = np.stack([np.ones_like(lx), lx], axis=1)
    (log_a, slope), *_ = np.linalg.lstsq(design, ly, rcond=None)
    resid = ly - (log_a + slope * lx)
    total = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((resid ** 2).sum()) / total if total > 0 else 1.0
    return {"a": float(math.exp(log_a)), "b": float(-slope), "r2": r2, "n": int(len(lx))}


def column(row: dict[str, Any]) -> str:
    """``task · protocol`` of a transfer row (few-shot: its primary shot count): the base of its column's label."""
    return f"{task_label(row)} · {protocol_label(row)}"


def setting_key(row: dict[str, Any]) -> str:
    """What a column is: the task with its settings and the protocol with every setting, so kNN at
    k=20 and at k=200 (or two fine-tune schedules) are two columns, never one that either wins."""
    what = [row.get("task"), row.get("task_settings") or {}, row.get("protocol"), row.get("settings") or {}]
    return json.dumps(what, sort_keys=True, default=str)


def column_labels(rows: list[dict[str, Any]]) -> dict[str, str]:
    """:func:`setting_key` → column label: ``task · protocol``, followed where several columns share it
    by the settings in which they differ, e.g. ``digits · knn (k=20)`` and ``digits · knn (k=200)``."""
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        flat = {**{f"task.{k}": v for k, v in (row.get("task_settings") or {}).items()}, **(row.get("settings") or {})}
        groups.setdefault(column(row), {}).setdefault(setting_key(row), flat)
    labels = {}
    for base, members in groups.items():
        names = sorted({k for flat in members.values() for k in flat})
        differ = [k for k in names if len({_value(f.get(k)) for f in members.values()}) > 1]
        for key, flat in members.items():
            shown = ", ".join(f"{k}={_value(flat.get(k))}" for k in differ)
            labels[key] = f"{base} ({shown})" if differ else base
    return labels


def _value(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RecipeError(f"{path}: unreadable {what} ({e})".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: not a {what} (expected a JSON object)")
    return data


def _transfer_rows(run_dir: Path, report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's rows, then rows of ``transfer/*.json`` for columns the report lacks (newest file
    first; ``partial.json``, the rows of a stopped suite, is left out)."""
    rows = list(report.get("transfer") or [])
    files = [p for p in (run_dir / "transfer").glob("*.json") if p.name != "partial.json"]
    extra = [_load_json(p, "transfer report") for p in files]
    extra.sort(key=lambda d: str((d.get("provenance") or {}).get("created", "")), reverse=True)
    return rows + [r for d in extra for r in d.get("transfer") or []]


def _data_label(data: dict[str, Any]) -> str:
    return task_name(data.get("name", "?"), data)


def _report(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "report.json"
    if not path.is_file():
        raise RecipeError(f"{run_dir}: no report.json there (not a finished bigmodel run directory)")
    return _load_json(path, "report.json")


def read_run(run_dir: str | Path, labels: dict[str, str] | None = None) -> dict[str, Any]:
    """One table row from a run directory, its columns named by ``labels`` (:func:`column_labels`;
    default: of this run's own rows). Raises RecipeError naming a folder without report.json."""
    run_dir = Path(run_dir)
    report = _report(run_dir)
    recipe, model = report.get("recipe") or {}, report.get("model") or {}
    steps = (report.get("pretrain") or {}).get("steps_done")
    per_step = model.get("train_gflops_per_step")
    rows = _transfer_rows(run_dir, report)
    labels = labels or column_labels(rows)
    top1: dict[str, float] = {}
    gap: dict[str, float] = {}
    for row in rows:
        results = row.get("results") or {}
        name = labels[setting_key(row)]
        if name in top1 or PRETRAINED not in results:  # the same settings twice: the report's row wins
            continue
        top1[name] = float(results[PRETRAINED]["top1"])
        if TWIN in results:
            gap[name] = top1[name] - float(results[TWIN]["top1"])
    return {
        "run": str(run_dir),
        "architecture": (recipe.get("architecture") or {}).get("name"),
        "size": (recipe.get("architecture") or {}).get("size"),
        "objective": (recipe.get("objective") or {}).get("name"),
        "data": _data_label(recipe.get("data") or {}),
        "params": model.get("backbone_params"),
        "steps": steps,
        "pretrain_gflops": None if per_step is None or steps is None else float(per_step) * steps,
        "top1": top1,
        "random_init_gap": gap,
    }


def _labels(runs: list[str]) -> list[str]:
    """Short run names: the folder names, or more of the path where two folders share a name."""
    names = [Path(r).name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(Path(r)) for r in runs]


def compare(run_dirs: list[str | Path]) -> dict[str, Any]:
    """The comparison of ``run_dirs``: ``{"rows", "columns", "fits"}`` (no files written).

    ``fits[axis][column]`` (axis ``compute`` or ``params``) is :func:`power_law` over the runs with
    that column, a positive x and an error above 0, when there are at least MIN_FIT_POINTS of them.
    """
    if not run_dirs:
        raise RecipeError("compare: give at least one run directory")
    dirs = [Path(d) for d in run_dirs]
    labels = column_labels([r for d in dirs for r in _transfer_rows(d, _report(d))])
    rows = [read_run(d, labels) for d in dirs]
    for row, label in zip(rows, _labels([r["run"] for r in rows]), strict=True):
        row["label"] = label
    columns = list(dict.fromkeys(c for r in rows for c in r["top1"]))
    fits: dict[str, dict[str, Any]] = {"compute": {}, "params": {}}
    for axis, key in (("compute", "pretrain_gflops"), ("params", "params")):
        for col in columns:
            pts = [(r[key], 100.0 - r["top1"][col]) for r in rows
                   if col in r["top1"] and r[key] and r[key] > 0 and 100.0 - r["top1"][col] > 0]
            if len(pts) >= MIN_FIT_POINTS and len({p[0] for p in pts}) > 1:
                fits[axis][col] = power_law(*zip(*pts, strict=True))
    return {"rows": rows, "columns": columns, "fits": fits}


def write(result: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """Write ``compare.json`` and a self-contained ``compare.html`` (plots embedded, also saved as
    PNG beside them) into ``out``; returns their paths."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"--out {out}: cannot be created ({e.strerror})") from None
    json_path = out / "compare.json"
    json_path.write_text(json.dumps(result, indent=1, default=str))
    figures = {"accuracy per protocol": _bars(result), "accuracy against pretraining compute":
               _scaling(result, "pretrain_gflops", "compute", "pretraining compute (GFLOPs spent, log)"),
               "accuracy against parameters": _scaling(result, "params", "params", "backbone parameters (log)")}
    for title, png in figures.items():
        if png:
            (out / f"compare-{title.replace(' ', '-')}.png").write_bytes(png)
    html_path = out / "compare.html"
    html_path.write_text(_html(result, figures))
    return json_path, html_path


# ---------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    _plt().close(fig)
    return buf.getvalue()


def _bars(result: dict[str, Any]) -> bytes | None:
    rows, columns = result["rows"], result["columns"]
    if not columns:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(14.0, max(7.5, 3.0 + 0.3 * len(columns) * len(rows))), 4.5), dpi=110)
    width = 0.8 / len(rows)
    colors = plt.get_cmap("tab10")
    twin_drawn = False
    for i, row in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j, c in enumerate(columns) if c in row["top1"]]
        ys = [row["top1"][c] for c in columns if c in row["top1"]]
        ax.bar(xs, ys, width * 0.95, label=row["label"], color=colors(i % 10))
        for x, c in zip(xs, [c for c in columns if c in row["top1"]], strict=True):
            if c in row["random_init_gap"]:
                twin = row["top1"][c] - row["random_init_gap"][c]
                ax.hlines(twin, x - width * 0.45, x + width * 0.45, colors="black", linewidth=2,
                          label=None if twin_drawn else "random-init twin")
                twin_drawn = True
    many = len(columns) > 3
    ax.set_xticks(range(len(columns)), columns, rotation=15 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Transfer accuracy per task · protocol (pretrained; black tick: random-init twin)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="run")
    return _png(fig)


def _scaling(result: dict[str, Any], key: str, axis: str, xlabel: str) -> bytes | None:
    rows, columns = result["rows"], result["columns"]
    if not columns or not any(r[key] for r in rows):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    colors = plt.get_cmap("tab10")
    for j, col in enumerate(columns):
        pts = sorted((r[key], r["top1"][col]) for r in rows if col in r["top1"] and r[key] and r[key] > 0)
        if not pts:
            continue
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, "o", color=colors(j % 10), label=col)
        fit = result["fits"][axis].get(col)
        if fit:
            grid = np.geomspace(min(xs), max(xs), 100)
            ax.plot(grid, 100 - fit["a"] * grid ** (-fit["b"]), "--", color=colors(j % 10),
                    label=f"fit: error = {fit['a']:.3g}·x^({-fit['b']:+.3g})")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%, pretrained)")
    no_fit = f" (no power-law fit: needs ≥ {MIN_FIT_POINTS} runs of different x)"
    ax.set_title(f"Accuracy against {'pretraining compute' if axis == 'compute' else 'parameters'}"
                 + ("" if result["fits"][axis] else no_fit))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# HTML


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _html(result: dict[str, Any], figures: dict[str, bytes | None]) -> str:
    columns = result["columns"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in
                   ("run", "architecture", "objective", "data", "params", "steps", "pretraining GFLOPs",
                    *columns))
    body = ""
    for r in result["rows"]:
        cells = [f'<td class="l" title="{html.escape(r["run"])}">{html.escape(r["label"])}</td>',
                 f'<td class="l">{html.escape(str(r["architecture"]))}'
                 f'{" " + html.escape(str(r["size"])) if r.get("size") else ""}</td>',
                 f'<td class="l">{html.escape(str(r["objective"]))}</td>',
                 f'<td class="l">{html.escape(r["data"])}</td>',
                 f"<td>{_fmt(r['params'])}</td>", f"<td>{_fmt(r['steps'])}</td>",
                 f"<td>{_fmt(r['pretrain_gflops'], 1)}</td>"]
        for c in columns:
            gap = r["random_init_gap"].get(c)
            cells.append(f"<td>{_fmt(r['top1'].get(c))}"
                         + (f' <span class="gap">({gap:+.2f})</span>' if gap is not None else "") + "</td>")
        body += "<tr>" + "".join(cells) + "</tr>"
    fits = "".join(f"<tr><td class='l'>{'compute (GFLOPs)' if axis == 'compute' else 'parameters'}</td>"
                   f"<td class='l'>{html.escape(col)}</td><td>{f['a']:.4g}</td><td>{f['b']:.4g}</td>"
                   f"<td>{f['r2']:.3f}</td><td>{f['n']}</td></tr>"
                   for axis, per in result["fits"].items() for col, f in per.items())
    fit_head = "<tr><th>x</th><th>task · protocol</th><th>a</th><th>b</th><th>R²</th><th>runs</th></tr>"
    fit_table = (f"<table>{fit_head}{fits}</table>"
                 if fits else f"<p>No fit: a power law is fitted where a column has at least {MIN_FIT_POINTS} runs "
                    f"(with different compute or parameters).</p>")
    imgs = "".join(f'<h2>{html.escape(t[0].upper() + t[1:])}</h2><img alt="{html.escape(t)}" '
                   f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                   for t, png in figures.items() if png)
    return f"""<!doctype html><meta charset="utf-8"><title>bigmodel compare</title>
<style>body{{font-family:sans-serif;max-width:75em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.2em .6em;text-align:right}}td.l{{text-align:left}}
.gap{{color:#666;font-size:.85em}}img{{max-width:100%}}</style>
<h1>bigmodel compare: {len(result['rows'])} runs</h1>
<h2>Runs</h2>
<p>Top-1 % on each task's test split for the pretrained backbone; in brackets its gap over the
random-init twin (points). Pretraining GFLOPs = training FLOPs per step × steps done.</p>
<table><tr>{head}</tr>{body}</table>
<h2>Power-law fits: error = a · x<sup>−b</sup> (error = 100 − top-1)</h2>{fit_table}
{imgs}
"""
