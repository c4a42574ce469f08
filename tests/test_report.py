"""The search report (ce_ray/tuning/report.py) from trial rows as :func:`ce_ray.tuning.report.trial_rows` makes them.

The end-to-end checks (report files of a real search) are in tests/test_tune.py.
"""

from __future__ import annotations

import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402

from ce_ray.config import load_job  # noqa: E402
from ce_ray.tuning import report  # noqa: E402

METRIC = "eval_ndcg@10"


def row(trial_id: str, loss: str, lr: float, curve: list[tuple[int, float]], status: str = "COMPLETED") -> dict:
    """A trial of a search over the learning rate and the loss only: no batch size among its params."""
    best_step, best = max(curve, key=lambda p: p[1])
    return {
        "trial_id": trial_id, "status": status, "params": {"train.learning_rate": lr, "train.loss": loss}, "loss": loss,
        "learning_rate": lr, "batch_size": None, f"final_{METRIC}": curve[-1][1], f"best_{METRIC}": best,
        "best_step": best_step, "steps": curve[-1][0], "max_steps": 20, "rounds": len(curve), "wall_time_s": 12.5,
        "error": "", "curve": curve,
    }  # fmt: skip


def search(tmp_path):
    rows = [
        row("a_00000", "BinaryCrossEntropyLoss", 1e-4, [(0, 0.20), (10, 0.50), (20, 0.60)]),
        row("a_00001", "BinaryCrossEntropyLoss", 3e-5, [(0, 0.20), (10, 0.40)], status="STOPPED_EARLY"),
        row("a_00002", "ListNetLoss", 5e-5, [(0, 0.20), (10, 0.45), (20, 0.55)]),
    ]
    job = load_job(None, base={"task": "rerank", "train": {"batch_size": 24, "learning_rate": 1e-4}})
    best = {
        "trial_id": "a_00000", "value": 0.60, "step": 20, "loss": "BinaryCrossEntropyLoss", "params": rows[0]["params"],
        "job": job.to_dict(), "trials_stopped_early": 1, "exported": "trial",
        "trial_quality": {"model": {"eval": {"ndcg@10": 0.60}, "test": {"ndcg@10": 0.58}}},
    }  # fmt: skip
    return rows, best


def test_a_batch_size_the_search_did_not_sample_shows_as_the_value_every_trial_used(tmp_path):
    rows, best = search(tmp_path)
    report.write_report(str(tmp_path), rows, best, METRIC)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "batch size )" not in md
    assert "Best trial **a_00000**: eval_ndcg@10 = **0.6** at step 20 (BinaryCrossEntropyLoss, learning rate 0.0001, batch size 24)." in md
    table = [line for line in md.splitlines() if line.startswith("| a_0000")]
    assert len(table) == 3 and all(line.split(" | ")[4] == "24" for line in table), table
    with open(tmp_path / "trials.csv") as f:
        assert [r["batch_size"] for r in csv.DictReader(f)] == ["24", "24", "24"]
    html = (tmp_path / "report" / "report.html").read_text()
    assert "batch size 24)" in html


def test_a_loss_the_search_did_not_sample_shows_as_the_jobs(tmp_path):
    rows, best = search(tmp_path)
    rows = [{**r, "loss": "", "params": {"train.learning_rate": r["learning_rate"]}} for r in rows]
    best = {**best, "loss": "", "params": rows[0]["params"]}
    report.write_report(str(tmp_path), rows, best, METRIC)
    md = (tmp_path / "report" / "report.md").read_text()
    assert "at step 20 (BinaryCrossEntropyLoss, learning rate 0.0001, batch size 24)." in md, md
    table = [line for line in md.splitlines() if line.startswith("| a_0000")]
    assert [line.split(" | ")[2] for line in table] == ["BinaryCrossEntropyLoss"] * 3, table


def test_each_trial_has_a_colour_and_line_style_of_its_own_and_its_legend_names_trial_and_loss(tmp_path):
    rows, _ = search(tmp_path)
    styles = report.trial_styles(rows)
    assert len({(to_rgba(s["color"]), s["linestyle"]) for s in styles.values()}) == 3
    # more trials than colours: the line style tells them apart
    many = [{**rows[0], "trial_id": f"t{i}"} for i in range(45)]
    assert len({(to_rgba(s["color"]), s["linestyle"]) for s in report.trial_styles(many).values()}) == 45

    fig, (curves, points) = plt.subplots(1, 2)
    report._draw_learning_curves(curves, rows, METRIC, styles)
    report._draw_metric_vs_lr(points, rows, METRIC, styles)
    lines = {line.get_label(): (to_rgba(line.get_color()), line.get_linestyle()) for line in curves.get_lines()}
    assert set(lines) == {"a_00000 BinaryCrossEntropyLoss", "a_00001 BinaryCrossEntropyLoss", "a_00002 ListNetLoss"}
    assert lines["a_00000 BinaryCrossEntropyLoss"] != lines["a_00001 BinaryCrossEntropyLoss"]  # same loss, two trials
    assert len(set(lines.values())) == 3
    dots = {c.get_label(): to_rgba(c.get_facecolor()[0]) for c in points.collections}
    assert set(dots) == {"a_00000 BinaryCrossEntropyLoss (completed)", "a_00001 BinaryCrossEntropyLoss (stopped_early)", "a_00002 ListNetLoss (completed)"}
    assert len(set(dots.values())) == 3
    # a trial keeps its colour from one plot to the other
    assert dots["a_00001 BinaryCrossEntropyLoss (stopped_early)"] == lines["a_00001 BinaryCrossEntropyLoss"][0]
    plt.close(fig)
