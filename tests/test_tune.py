"""Hyperparameter search on a real local Ray: trials, ASHA early stopping, best model, resume."""

from __future__ import annotations

import csv
import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ray_process_pids
from ce_ray.config import ConfigError, load_job
from ce_ray.tuning import run_tuning, search_space

pytestmark = pytest.mark.slow


def keyword_nli(path: Path, rows: int, seed: int) -> str:
    """A constructed NLI set a tiny model learns in a few dozen steps: the label is the hypothesis's first word."""
    rng = random.Random(seed)
    subjects = ["a man", "the dog", "two kids", "a woman", "the cat", "an old lady", "a chef", "the team"]
    words = ["yes", "perhaps", "no"]
    frame = pd.DataFrame(
        [
            {"premise": f"{rng.choice(subjects)} is outside today", "hypothesis": f"{words[i % 3]} {rng.choice(subjects)} is here", "label": i % 3}
            for i in range(rows)
        ]
    )
    frame.to_parquet(path)
    return str(path)


def test_nli_search_stops_a_bad_trial_early_and_exports_the_best(tiny_model, tmp_path, ray_session):
    """3 trials over lr x batch size x loss; the two with a useless learning rate are cut by ASHA."""
    train = keyword_nli(tmp_path / "train.parquet", 256, seed=0)
    dev = keyword_nli(tmp_path / "dev.parquet", 64, seed=1)
    space = {
        "train.learning_rate": {"choice": [1e-2, 1e-9]},
        "train.batch_size": {"choice": [16, 32]},
        "train.loss": {"choice": ["CrossEntropyLoss", {"name": "CrossEntropyLoss", "label_smoothing": 0.1}, {"name": "CrossEntropyLoss", "class_weights": "balanced"}]},
    }
    job = load_job(
        None,
        base={
            "task": "nli",
            "model": {"name": tiny_model},
            "data": {"train": train, "eval": dev, "test": dev},
            # fp32: the same learning dynamics on every CPU (precision auto would pick bf16 on some)
            "train": {"max_steps": 48, "warmup_ratio": 0.0, "precision": "fp32"},
            "run": {"output_dir": str(tmp_path / "out"), "name": "kw", "checkpoint_every": 24},
            "tune": {
                "num_samples": 3,
                "search": "random",
                "scheduler": "asha",
                "grace_period": 1,
                "reduction_factor": 2,
                "max_concurrent_trials": 1,
                "search_space": space,
                "refit": True,  # then the best config once more, on all rows (refit_set default: data.train.select null)
                # the good trial runs first, so the bad ones meet a recorded rung
                "points_to_evaluate": [
                    {"train.learning_rate": 1e-2, "train.batch_size": 16, "train.loss": "CrossEntropyLoss"},
                    {"train.learning_rate": 1e-9, "train.batch_size": 32, "train.loss": {"name": "CrossEntropyLoss", "label_smoothing": 0.1}},
                    {"train.learning_rate": 1e-9, "train.batch_size": 16, "train.loss": {"name": "CrossEntropyLoss", "class_weights": "balanced"}},
                ],
            },
        },
    )
    outcome = run_tuning(job)
    out = tmp_path / "out"

    statuses = {t["trial_id"]: t["status"] for t in outcome.trials}
    assert len(outcome.trials) == 3
    assert list(statuses.values()).count("STOPPED_EARLY") >= 1, outcome.trials
    best = json.loads((out / "best.json").read_text())
    assert best["params"]["train.learning_rate"] == 1e-2
    assert statuses[best["trial_id"]] == "COMPLETED"
    assert best["metric"] == "eval_accuracy" and best["value"] > 0.5
    assert best["trials_stopped_early"] >= 1
    # trials stopped by ASHA gave their workers' resources back (Train V2 alone would keep them reserved)
    from ray.util.placement_group import placement_group_table

    held = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert not held, held

    # best/ is a plain CrossEncoder directory that scores on the test rows (as recorded in best.json)
    from sentence_transformers.cross_encoder import CrossEncoder

    from ce_ray.data import load_split
    from ce_ray.tasks import NLI

    model = CrossEncoder(str(out / "best"))
    rows = load_split(load_job(None, ["task=nli", f"data.test={dev}"]), "test")
    assert NLI.evaluate(model, rows.table)["accuracy"] == pytest.approx(best["test_score"])
    assert best["test_score"] > 0.5

    # The refit trained the winner's config again on every training row, and best/ is whichever of the two
    # scored higher on the eval rows (the refit on a tie); both test scores are recorded.
    refit = best["refit"]
    refit_summary = json.loads((out / "refit" / "summary.json").read_text())
    assert refit["train_rows"] == 256 and refit_summary["train_rows"] == 256
    # Every trial and the refit start from the same model on the same eval rows: their step-0 score is one,
    # scored by the first trial and read by the others (one trial at a time here)
    starts = [t["metrics_before"] for t in outcome.trials]
    assert starts[0] and all(s == starts[0] for s in starts)
    assert refit_summary["metrics_before_reused"] and refit_summary["metrics_before"] == starts[0]
    assert refit["set"] == {"data.train.select": None}
    trial_eval = best["trial_quality"]["model"]["eval"]["accuracy"]
    assert best["value"] == pytest.approx(trial_eval)
    assert refit["chosen"] == (refit["eval_value"] >= trial_eval)
    assert best["exported"] == ("refit" if refit["chosen"] else "trial")
    exported = refit["quality"] if refit["chosen"] else best["trial_quality"]
    assert best["test_metrics"] == exported["model"]["test"]
    assert best["baseline"] is None and best["verdict"] is None  # nli has no retriever baseline
    report_md = (out / "report" / "report.md").read_text()
    assert "| refit (" in report_md and "(exported as best/)" in report_md

    # best/'s model card: the training facts of whichever model it is, and a short summary of the search.
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "best" / "README.md")
    assert card.data.base_model == Path(tiny_model).name and {"ce-ray", "ray-tune"} <= set(card.data.tags)
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("test", "accuracy")] == pytest.approx(best["test_score"])
    text = card.text
    assert text.count("## Training with ce-ray") == 1 and text.count("## Hyperparameter search") == 1
    assert "| Trials | 3 (" in text and "| Search | random, scheduler asha |" in text and "| Metric | eval accuracy (max) |" in text
    assert f"| Best trial | `{best['trial_id']}`: eval accuracy {best['value']:.4f} at step {best['step']} |" in text
    assert "`train.learning_rate` = 0.01" in text and "`train.loss` = `CrossEntropyLoss`" in text
    exported = "configuration trained again with `data.train.select: null`" if refit["chosen"] else "the best trial's best checkpoint"
    assert exported in text

    with open(out / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and {"trial_id", "status", "loss", "learning_rate", "best_eval_accuracy", "wall_time_s"} <= set(table[0])
    assert {"CrossEntropyLoss", "CrossEntropyLoss(label_smoothing=0.1)", "CrossEntropyLoss(class_weights=balanced)"} == {r["loss"] for r in table}
    for name in ("metric_vs_lr.png", "learning_curves.png", "report.md", "report.html"):
        assert (out / "report" / name).stat().st_size > 0


def whole_node_trial(tiny_model, tmp_path, ray, name: str, rows: int, max_steps: int, checkpoint_every: int, relative=False):
    """A one-trial search whose single worker takes every CPU of the node (``relative``: the job names its files
    relative to ``tmp_path``, the directory the test runs in)."""
    cpus = int(ray.cluster_resources()["CPU"])
    train = keyword_nli(tmp_path / "train.parquet", rows, seed=0)
    if relative:
        train = os.path.relpath(train, tmp_path)
    return load_job(
        None,
        base={
            "task": "nli",
            "model": {"name": tiny_model},
            "data": {"train": train, "eval": train},
            "train": {"max_steps": max_steps, "batch_size": 16},
            "scaling": {"num_workers": 1, "cpus_per_worker": cpus},
            "run": {"output_dir": "out" if relative else str(tmp_path / "out"), "name": name, "checkpoint_every": checkpoint_every},
            "tune": {"num_samples": 1, "search": "random", "scheduler": "none", "max_failures": 1,
                     "search_space": {"train.learning_rate": {"choice": [1e-3]}}},
        },
    )


def test_a_trial_whose_workers_take_every_cpu_still_runs(tiny_model, tmp_path, ray_session, monkeypatch):
    """The trial's driver holds no CPU, so workers may take all of them (it used to wait forever). The job names its
    files relative to the directory ce-ray runs in, as the shipped jobs do: the trial, which Tune runs in its own
    directory, reads the same files (it used to fail with "data.eval: file not found")."""
    monkeypatch.chdir(tmp_path)
    job = whole_node_trial(tiny_model, tmp_path, ray_session, "allcpus", rows=64, max_steps=4, checkpoint_every=4, relative=True)
    assert job.data.train.path == "train.parquet"
    outcome = run_tuning(job)
    assert [t["status"] for t in outcome.trials] == ["COMPLETED"], outcome.trials
    # the search sampled the learning rate only: the report shows the batch size the trial used (the job's)
    report_md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "batch size 16)." in report_md and "batch size )" not in report_md
    assert re.search(r"^\| \S+ \| COMPLETED \| CrossEntropyLoss \| 0\.001 \| 16 \| ", report_md, re.M), report_md
    # without a refit, best/ is the best trial's checkpoint, carded by the search (not by a training run)
    from huggingface_hub import ModelCard

    best = json.loads((tmp_path / "out" / "best.json").read_text())
    card = ModelCard.load(tmp_path / "out" / "best" / "README.md")
    assert card.data.pipeline_tag == "text-classification" and "ray-tune" in card.data.tags
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("eval", "accuracy")] == pytest.approx(best["value"])
    assert "| Trials | 1 (0 stopped early) |" in card.text and "| Loss | `CrossEntropyLoss` |" in card.text
    assert f"| This model | the best checkpoint by eval accuracy, step {best['step']} |" in card.text


def test_a_trial_whose_driver_crashes_is_retried_on_the_cpus_it_held(tiny_model, tmp_path, ray_session):
    """Kill a trial's driver mid-training (as the node's OOM killer may); Tune retries the trial
    (tune.max_failures), the retry gets every CPU again and finishes, and no placement group stays reserved."""
    from ray.util.placement_group import placement_group_table

    job = whole_node_trial(tiny_model, tmp_path, ray_session, "crash", rows=256, max_steps=600, checkpoint_every=300)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("outcome", run_tuning(job)))
    thread.start()
    stats_glob = str(tmp_path / "out" / "crash-trials" / "trial-*" / "workers" / "rank0.json")
    deadline = time.time() + 180
    while time.time() < deadline and not glob.glob(stats_glob):
        assert thread.is_alive(), "the search ended before its workers started"
        time.sleep(0.2)
    first = json.loads(Path(glob.glob(stats_glob)[0]).read_text())
    assert first["status"] == "running" and first["placement_group_id"]
    drivers = ray_process_pids("ImplicitFunc")  # the trial's driver function
    assert len(drivers) == 1, drivers
    os.kill(drivers[0], signal.SIGKILL)

    thread.join(timeout=400)
    assert not thread.is_alive(), "the retried trial is still waiting"
    assert [t["status"] for t in result["outcome"].trials] == ["COMPLETED"], result["outcome"].trials
    second = json.loads(Path(glob.glob(stats_glob)[0]).read_text())
    assert second["placement_group_id"] != first["placement_group_id"]  # it really ran a second attempt
    held = [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert not held, held


def test_bad_search_spaces_fail_before_ray(tmp_path):
    job = load_job(
        None,
        base={
            "task": "rerank",
            "tune": {
                "search_space": {
                    "train.learning_rate": {"loguniform": [0, 1e-4]},
                    "train.batch_sise": {"choice": [16]},
                    "train.loss": {"choice": ["BinaryCrossEntropyLoss", "CrossEntropyLoss"]},
                }
            },
        },
    )
    with pytest.raises(ConfigError) as info:
        search_space(job)
    errors = info.value.errors
    assert "tune.search_space.train.learning_rate: loguniform needs 0 < low < high" in errors
    assert any(e.startswith("tune.search_space.train.batch_sise = 16: train.batch_sise: unknown key") for e in errors)
    assert any(e.startswith("tune.search_space.train.loss = 'CrossEntropyLoss': train.loss: CrossEntropyLoss does not fit task rerank") for e in errors)


def _terminated_trials(experiment: Path) -> set[str]:
    done = set()
    for path in glob.glob(str(experiment / "experiment_state-*.json")):
        try:
            state = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, OSError):  # being rewritten
            continue
        for trial_json, _ in state["trial_data"]:
            trial = json.loads(trial_json)
            if trial["status"] == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def test_a_killed_tune_keeps_its_finished_trials_and_then_continues_its_refit(tiny_model, qa_files, tmp_path):
    """Kill `ce-ray tune` after its first trial finished: the re-run keeps that trial and runs the other. Kill that
    re-run once its refit has saved a checkpoint: the third run keeps the whole search and resumes the refit."""
    out = tmp_path / "out"
    job_file = tmp_path / "rerank_tune.yaml"
    job = {
        "task": "rerank",
        "model": {"name": tiny_model, "max_length": 64},
        "data": {
            "train": {"path": qa_files["train"], "columns": {"query": "question", "positive": "answer"}, "select": 48},
            "eval": qa_files["dev"],
            "negatives": {"num": 2},
        },
        "train": {"max_steps": 12},
        "run": {"output_dir": str(out), "name": "rr", "checkpoint_every": 6},
        "tune": {
            "num_samples": 2,
            "search": "optuna",
            "scheduler": "none",
            "max_concurrent_trials": 1,
            "search_space": {
                "train.learning_rate": {"loguniform": [1e-5, 1e-3]},
                "train.batch_size": {"choice": [8, 16]},
                "train.loss": {"choice": ["BinaryCrossEntropyLoss", "MultipleNegativesRankingLoss", "ListNetLoss"]},
            },
            "refit": True,
            "refit_set": {"data.train.select": None, "train.max_steps": 36},
        },
    }
    job_file.write_text(yaml.safe_dump(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "ce_ray.cli", "tune", str(job_file)]
    experiment, refit_run = out / "rr", out / "refit" / "rr-refit"

    def run_until(name: str, done, argv: list[str]) -> str:
        """Run ``argv`` until ``done()`` holds, then kill it (the driver and the local Ray it started); its output."""
        with open(tmp_path / f"{name}.log", "w") as log:
            proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.time() + 420
            try:
                while time.time() < deadline and not done():
                    assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
                    time.sleep(0.2)
                assert done(), f"{name}: not there in time"
            finally:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        return (tmp_path / f"{name}.log").read_text()

    # 1. Killed after its first trial finished. --verbose: Ray's, Tune's and the workers' output on its terminal,
    #    and no log file.
    verbose = run_until("first", lambda: bool(_terminated_trials(experiment)), [*command, "--verbose"])
    finished = _terminated_trials(experiment)
    assert not (out / "best.json").exists()
    assert "Started a local Ray instance" in verbose and "RayTrainWorker" in verbose, verbose[-3000:]
    assert "tune: 2 trials, up to 1 at a time, optuna search; metric eval_ndcg@10 (max)" in verbose.splitlines(), verbose[-3000:]  # ce-ray's own lines too
    assert not (out / "logs").exists()
    kept = {t: (out / "rr-trials" / f"trial-{t}" / "workers" / "rank0.json").read_text() for t in finished}

    # 2. The re-run keeps the finished trial, runs the other, and is killed once its refit saved a checkpoint
    #    (registered with Ray Train: its snapshot names it).
    second = run_until("second", (refit_run / "checkpoint_manager_snapshot.json").exists, command)
    assert not (out / "best.json").exists()
    # The console had ce-ray's lines (a line per trial it ran), not Tune's tables or Ray's logs: those are in the
    # run's log. The resumed search found the console through the callback Tune restored.
    console = second.splitlines()
    assert console[0].startswith("ce-ray tune ") and f"{out / 'logs' / 'console.log'};" in console[0], console
    assert any(line.startswith("tune: resuming the experiment") for line in console), console
    ran = [line for line in console if line.startswith("trial ") and " finished at step 12/12: " in line]
    assert len(ran) == 2 - len(finished), console
    # Each trial it ran showed its rank 0's progress in the lines of ce-ray train, headed by the trial id: a step
    # line (the start, then every 10 s on a plain console) before the trial's first evaluation and before that
    # round reached Tune's results, and its last step when its training ended.
    for line in ran:
        head = f"trial {line.split()[1]}: "
        steps = [i for i, text in enumerate(console) if re.match(rf"{re.escape(head)}step \d+/12 \d+%", text)]
        evals = [i for i, text in enumerate(console) if text.startswith(head + "eval at step ")]
        board = [i for i, text in enumerate(console) if text.startswith("tune: ") and f" {head[:-2]} at step " in text]
        assert steps and evals and board and steps[0] < evals[0] < board[0], console
        assert console[steps[-1]].startswith(head + "step 12/12 100%") and " done in " in console[steps[-1]], console
    assert any(line.startswith("refit: training the best trial's config again") for line in console), console
    noise = ("Started a local Ray instance", "Trial status", "RayTrainWorker", "TrainController")
    assert not any(n in second for n in noise), second[-3000:]
    assert all(n in (out / "logs" / "console.log").read_text() for n in noise)

    # 3. The third run keeps the search and continues the refit from its checkpoint.
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    console = third.stdout.splitlines()
    assert any(line.startswith("tune: resuming the experiment") for line in console), console
    assert not any(line.startswith("trial ") and " finished at step " in line for line in console), console  # kept
    assert any(line.startswith("refit: resuming the refit of the best trial's config again") for line in console), console
    assert any(line.startswith(f"best model: {out / 'best'}") for line in console), console
    stats = json.loads((out / "refit" / "workers" / "rank0.json").read_text())
    assert stats["resumed"] is True and stats["global_step"] == 36, stats
    assert 0 <= stats["steps_this_attempt"] <= 30, stats  # continued from step 6 or later, not from 0

    with open(out / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2  # restored, not a new experiment of 2 more
    assert {r["status"] for r in table} == {"COMPLETED"}
    assert {r["loss"] for r in table} <= {"BinaryCrossEntropyLoss", "MultipleNegativesRankingLoss", "ListNetLoss"}
    for trial_id, trial_stats in kept.items():  # the trial finished before the first kill was not trained again
        assert (out / "rr-trials" / f"trial-{trial_id}" / "workers" / "rank0.json").read_text() == trial_stats
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "eval_ndcg@10" and (out / "best" / "model.safetensors").exists()
    assert best["refit"]["train_rows"] > 48
    # best/'s card: whichever model it is, with the search's summary and the retriever it is set beside
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "best" / "README.md")
    assert card.data.pipeline_tag == "text-ranking" and "ray-tune" in card.data.tags
    assert f"| Loss | `{best['loss']}` |" in card.text and "| Trials | 2 (0 stopped early) |" in card.text
    exported = "refit" if best["refit"]["chosen"] else "trial"
    assert best["exported"] == exported
    after = (best["refit"]["quality"] if exported == "refit" else best["trial_quality"])["model"]["eval"]["ndcg@10"]
    baseline = best["baseline"]["eval"]["ndcg@10"]
    assert re.search(rf"\| \*\*ndcg@10\*\* \| \d\.\d{{4}} \| {after:.4f} \| {baseline:.4f} \|", card.text)  # before | after | retriever
    if exported == "trial":  # best/ is the best trial's checkpoint, carded by the search (not by a training run)
        assert f"| This model | the best checkpoint by eval ndcg@10, step {best['step']} |" in card.text
