"""The results of a search: one row per trial, plots and a Markdown/HTML summary.

Written by :func:`ce_ray.tuning.run_tuning` into ``<output_dir>``:

- ``trials.csv``: trial id, status (COMPLETED, STOPPED_EARLY by the scheduler, ERROR), sampled
  values, loss, final and best metric (and the step of the best), steps, wall time, error;
- ``report/metric_vs_lr.png``: best metric of each trial against its learning rate, with the retriever
  baseline (rerank) as a dashed line;
- ``report/learning_curves.png``: the metric of every trial over its steps (baseline dashed); in both
  plots each trial has a colour and line style of its own (:func:`trial_styles`), its legend entry names
  the trial and its loss;
- ``report/report.md`` and ``report/report.html``: the best trial, the refit (``tune.refit``), the
  retriever baseline next to them on eval and test rows with the verdict, and the table of all trials.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
import tempfile
from typing import Any

from ce_ray import storage
from ce_ray.config import LossConfig
from ce_ray.tasks import best_by, plain_metrics

__all__ = ["trial_rows", "trial_styles", "write_report"]


def _loss_label(params: dict[str, Any]) -> str:
    value = params.get("train.loss")
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith("{"):
        value = json.loads(value)
    return LossConfig.model_validate(value).label()


def _status(result, last: dict[str, Any]) -> str:
    if result.error is not None:
        return "ERROR"
    step, max_steps = last.get("step"), last.get("max_steps")
    if step is not None and max_steps and step < max_steps:
        return "STOPPED_EARLY"
    return "COMPLETED" if step is not None else "NOT_STARTED"


def trial_rows(results, metric: str, mode: str, space: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per trial of a Tune ``ResultGrid`` (see module docstring for the fields)."""
    rows = []
    for result in results:
        frame = result.metrics_dataframe
        reports = frame.to_dict("records") if frame is not None and metric in frame else []
        reports = [r for r in reports if r.get(metric) == r.get(metric) and r.get(metric) is not None]  # drop NaN
        last = reports[-1] if reports else dict(result.metrics or {})
        with_ckpt = [r for r in reports if r.get("checkpoint_path") and storage.exists(r["checkpoint_path"])]
        best = best_by(with_ckpt, metric, mode) if with_ckpt else None
        params = {k: result.config[k] for k in space if k in result.config}
        decoded = {k: json.loads(v) if isinstance(v, str) and v.startswith("{") else v for k, v in params.items()}
        rows.append(
            {
                "trial_id": (result.metrics or {}).get("trial_id") or os.path.basename(result.path or ""),
                "status": _status(result, last),
                "params": decoded,
                "loss": _loss_label(params),
                "learning_rate": decoded.get("train.learning_rate"),
                "batch_size": decoded.get("train.batch_size"),
                f"final_{metric}": last.get(metric),
                f"best_{metric}": best[metric] if best else None,
                "best_step": best.get("step") if best else None,
                "best_metrics": plain_metrics(best) if best else {},
                "metrics_before": plain_metrics(best, "baseline_") if best else {},
                "best_checkpoint": best["checkpoint_path"] if best else None,
                "baseline": last.get("baseline_" + metric[len("eval_") :]) if metric.startswith("eval_") else None,
                "steps": last.get("step"),
                "max_steps": last.get("max_steps"),
                "rounds": len(reports),
                "wall_time_s": (result.metrics or {}).get("time_total_s"),
                "error": str(result.error).splitlines()[0][:300] if result.error is not None else "",
                "curve": [(r.get("step"), r[metric]) for r in reports],
            }
        )
    return rows


CSV_FIELDS = ["trial_id", "status", "loss", "learning_rate", "batch_size", "params", "final", "best", "best_step", "steps", "max_steps", "rounds", "wall_time_s", "error"]


def _csv(rows: list[dict[str, Any]], metric: str) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    header = [f if f not in ("final", "best") else f"{f}_{metric}" for f in CSV_FIELDS]
    writer.writerow(header)
    for row in rows:
        writer.writerow(
            [json.dumps(row["params"], sort_keys=True) if f == "params" else row.get(f if f not in ("final", "best") else f"{f}_{metric}") for f in CSV_FIELDS]
        )
    return buffer.getvalue()


def _baseline_line(ax, best: dict[str, Any], metric: str) -> None:
    value = ((best.get("baseline") or {}).get("eval") or {}).get(metric.removeprefix("eval_"))
    if value is not None:
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label=f"retriever baseline {value:.3f}")


_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = {"COMPLETED": "o", "STOPPED_EARLY": "v", "ERROR": "x", "NOT_STARTED": "."}


def trial_styles(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each trial's ``color`` and ``linestyle`` in the plots, in the order of ``rows``: a colour of its own
    (tab10, tab20 beyond ten trials), then the next line style once the colours are used up."""
    import matplotlib

    palette = matplotlib.colormaps["tab10" if len(rows) <= 10 else "tab20"]
    n = palette.N
    return {r["trial_id"]: {"color": palette(i % n), "linestyle": _LINESTYLES[(i // n) % len(_LINESTYLES)]} for i, r in enumerate(rows)}


def _draw_metric_vs_lr(ax, rows: list[dict[str, Any]], metric: str, styles: dict[str, dict[str, Any]]) -> None:
    """One point per trial (best metric at its learning rate): its colour, a marker for its status."""
    for r in rows:
        if r[f"best_{metric}"] is not None and r["learning_rate"]:
            marker = _MARKERS.get(r["status"], ".")
            ax.scatter([r["learning_rate"]], [r[f"best_{metric}"]], color=styles[r["trial_id"]]["color"], marker=marker, s=60,
                       label=f"{r['trial_id']} {r['loss']} ({r['status'].lower()})")  # fmt: skip


def _draw_learning_curves(ax, rows: list[dict[str, Any]], metric: str, styles: dict[str, dict[str, Any]]) -> None:
    """The metric of each trial over its steps, in its colour and line style."""
    for r in rows:
        curve = [(s, v) for s, v in r["curve"] if s is not None]
        if curve:
            ax.plot(*zip(*curve), marker=".", alpha=0.8, label=f"{r['trial_id']} {r['loss']}", **styles[r["trial_id"]])


def _plots(rows: list[dict[str, Any]], metric: str, out_dir: str, best: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = trial_styles(rows)
    files = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_metric_vs_lr(ax, rows, metric, styles)
    _baseline_line(ax, best, metric)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"best {metric}")
    ax.set_title(f"{metric} vs learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    files.append("metric_vs_lr.png")
    fig.savefig(os.path.join(out_dir, files[-1]), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_learning_curves(ax, rows, metric, styles)
    _baseline_line(ax, best, metric)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title("learning curves (evaluation rounds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    files.append("learning_curves.png")
    fig.savefig(os.path.join(out_dir, files[-1]), dpi=110)
    plt.close(fig)
    return files


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _markdown(rows: list[dict[str, Any]], best: dict[str, Any], metric: str, plots: list[str]) -> str:
    train = (best.get("job") or {}).get("train") or {}  # the values of the keys the search did not sample
    lr, batch = (best["params"].get(f"train.{k}", train.get(k)) for k in ("learning_rate", "batch_size"))
    loss = best["loss"] or _loss_label({"train.loss": train.get("loss")})
    lines = [
        "# Hyperparameter search",
        "",
        f"Best trial **{best['trial_id']}**: {metric} = **{_fmt(best['value'])}** at step {best['step']} "
        f"({loss}, learning rate {_fmt(lr)}, batch size {_fmt(batch)}).",
    ]
    if "test_metrics" in best:
        lines.append(f"Test: {', '.join(f'{k} {_fmt(v)}' for k, v in best['test_metrics'].items())}.")
    lines += _comparison(best, metric)
    lines += ["", f"{len(rows)} trials, {best['trials_stopped_early']} stopped early by the scheduler.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    lines += ["", f"| trial | status | loss | lr | batch | best {metric} | step | final | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: -(r[f"best_{metric}"] or float("-inf"))):
        lines.append(
            f"| {r['trial_id']} | {r['status']} | {r['loss']} | {_fmt(r['learning_rate'])} | {_fmt(r['batch_size'])} | "
            f"{_fmt(r[f'best_{metric}'])} | {_fmt(r['best_step'])} | {_fmt(r[f'final_{metric}'])} | {_fmt(r['wall_time_s'])} |"
        )
    return "\n".join(lines) + "\n"


def _comparison(best: dict[str, Any], metric: str) -> list[str]:
    """The exported model, the best trial, the refit and the retriever baseline on eval and test rows."""
    plain = metric.removeprefix("eval_")
    entries = [("trial", "search best trial", best.get("trial_quality"))]
    if best.get("refit"):
        entries.append(("refit", f"refit ({json.dumps(best['refit'].get('set'))})", best["refit"].get("quality")))
    baseline = best.get("baseline")
    if baseline:
        entries.append(("baseline", f"retriever baseline: {baseline['model']} (zero-shot cosine)", {"model": baseline}))
    fusion = best.get("fusion")
    if fusion:
        label = f"fused: best/ with the retriever (weight {fusion['weight']:g} fitted on eval, {fusion['normalisation']})"
        entries.append(("fused", label, {"model": fusion}))
    lines = ["", f"| model | eval {plain} | test {plain} |", "|---|---|---|"]
    for kind, label, quality in entries:
        scores = (quality or {}).get("model") or {}
        shown = label + (" **(exported as best/)**" if kind == best.get("exported") else "")
        lines.append(f"| {shown} | {_fmt((scores.get('eval') or {}).get(plain))} | {_fmt((scores.get('test') or {}).get(plain))} |")
    if best.get("verdict"):
        lines += ["", best["verdict"]["message"]]
    return lines


def _html(markdown: str, plots: list[str]) -> str:
    body = []
    table: list[list[str]] = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                table.append([c.strip() for c in line.strip("|").split("|")])
            continue
        if table:
            head, *rest = table
            body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest]
            body.append("</table>")
            table = []
        if line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.startswith("!["):
            src = line[line.index("(") + 1 : -1]
            body.append(f'<img src="{html.escape(src)}" alt="{html.escape(src)}" style="max-width:48%">')
        elif line:
            body.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    if table:
        head, *rest = table
        body.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
        body += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rest]
        body.append("</table>")
    style = "body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>ce-ray search</title><style>{style}</style></head><body>{''.join(body)}</body></html>\n"


def _with_fixed_values(rows: list[dict[str, Any]], best: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows with the loss, learning rate and batch size every trial used when the search did not sample
    them (the job's ``train.loss``, ``train.learning_rate``, ``train.batch_size``, as in the best trial's job)."""
    train = (best.get("job") or {}).get("train") or {}
    fixed = {k: train.get(k) for k in ("learning_rate", "batch_size")}
    fixed["loss"] = _loss_label({"train.loss": train.get("loss")})
    return [{**r, **{k: v for k, v in fixed.items() if not r.get(k)}} for r in rows]


def write_report(out_uri: str, rows: list[dict[str, Any]], best: dict[str, Any], metric: str) -> str:
    """Write ``trials.csv`` and ``report/`` under ``out_uri`` (atomically); returns the report location."""
    rows = _with_fixed_values(rows, best)
    storage.write_bytes(storage.join(out_uri, "trials.csv"), _csv(rows, metric).encode())
    with tempfile.TemporaryDirectory(prefix="ce_ray_report_") as tmp:
        plots = _plots(rows, metric, tmp, best)
        markdown = _markdown(rows, best, metric, plots)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(markdown)
        with open(os.path.join(tmp, "report.html"), "w") as f:
            f.write(_html(markdown, plots))
        return storage.publish_dir(tmp, storage.join(out_uri, "report"))
