"""Distributed training on a real local Ray: DDP sharding, identical weights, faults, resume, outputs."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import ray_process_pids

from ce_ray.config import ConfigError, load_job
from ce_ray.training import run_training


def nli_job(tiny_model, nli_files, out: Path, *overrides: str):
    return load_job(
        None,
        [
            "task=nli",
            f"model.name={tiny_model}",
            f"data.train={nli_files['train']}",  # 256 rows
            f"data.eval={nli_files['dev']}",
            "train.batch_size=32",
            "train.learning_rate=1e-3",
            f"run.output_dir={out}",
            "run.name=t",
            *overrides,
        ],
    )


def worker_stats(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "workers").glob("rank*.json"))]


def test_the_driver_side_needs_no_trainer_imports_and_names_rays_checkpoint_folder():
    """The processes that only start a run (the driver, a Tune trial's driver) do not import transformers' Trainer,
    sentence-transformers or scikit-learn (~3 s a process); the checkpoint folder they read is the one Ray writes."""
    import subprocess
    import sys

    code = ("import sys; from ce_ray.training import make_trainer; from ce_ray.tuning.driver import _trial_driver; "
            "print(sorted(m for m in ('transformers.trainer', 'sentence_transformers', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    from ray.train.huggingface.transformers import RayTrainReportCallback

    from ce_ray.training.checkpoint import CHECKPOINT_SUBDIR

    assert CHECKPOINT_SUBDIR == RayTrainReportCallback.CHECKPOINT_NAME


def test_the_step_0_score_is_kept_for_the_next_run_from_the_same_model_and_rows(tiny_model, nli_files, tmp_path):
    """The evaluation at step 0 runs once per model and eval rows: a later run (a trial with another learning rate,
    the refit) reads it, with no forward pass; another model, or other rows, score again."""
    import torch

    from ce_ray.data.prepare import load_prepared, prepare_split
    from ce_ray.modeling import load_cross_encoder
    from ce_ray.tasks import NLI
    from ce_ray.training.instrument import CountingEvaluator, start_score_key

    job = load_job(None, ["task=nli", f"model.name={tiny_model}", f"data.train={nli_files['train']}",
                          f"data.eval={nli_files['dev']}", f"run.output_dir={tmp_path / 'run'}"])
    rows = load_prepared(prepare_split(job, "eval").uri).data.table
    forward = []

    def model_for(j):
        torch.manual_seed(j.train.seed)
        model = load_cross_encoder(j.model, j.task, device="cpu")
        model.register_forward_hook(lambda *a: forward.append(1))
        return model

    def step_0(j, model):
        uri = str(tmp_path / f"start-{hash(json.dumps(start_score_key(j, model, 'eval-rows', 'fp32'), sort_keys=True))}.json")
        evaluator = CountingEvaluator(NLI.evaluator(rows, 16), uri)
        return evaluator(model, steps=0), evaluator

    first, scored = step_0(job, model_for(job))
    assert forward and not scored.start_reused
    forward.clear()
    other_lr = job.model_copy(update={"train": job.train.model_copy(update={"learning_rate": 1e-9})})
    again, reused = step_0(other_lr, model_for(other_lr))
    assert again == first and reused.start_reused and not forward
    assert reused.primary_metric == scored.primary_metric and again[reused.primary_metric] == first[scored.primary_metric]
    # another head (another seed): its own score
    other_seed = job.model_copy(update={"train": job.train.model_copy(update={"seed": 7})})
    _, rescored = step_0(other_seed, model_for(other_seed))
    assert forward and not rescored.start_reused
    # a later evaluation always runs
    forward.clear()
    reused(model_for(job), steps=8)
    assert forward


def test_two_workers_shard_the_data_and_end_with_identical_weights(tiny_model, nli_files, tmp_path, ray_session):
    out = tmp_path / "run"
    job = nli_job(tiny_model, nli_files, out, "scaling.num_workers=2", "run.checkpoint_every=4", "run.log_row_ids=true")
    outcome = run_training(job)
    summary = json.loads((out / "summary.json").read_text())

    # Each worker ran rows / (workers x batch) steps: 256 / (2 x 16 per worker) = 8.
    assert summary["world_size"] == 2
    assert summary["steps_per_worker"] == [8, 8]
    stats = worker_stats(out)
    assert [s["rank"] for s in stats] == [0, 1]
    assert all(s["status"] == "done" and s["per_device_batch_size"] == 16 for s in stats)

    # ...on disjoint rows that together cover the training set once.
    rows = [set(s["row_ids"]) for s in stats]
    assert len(stats[0]["row_ids"]) == len(rows[0]) == 128 and len(rows[1]) == 128
    assert not rows[0] & rows[1]

    # Gradients were synced: both ranks hold the same weights.
    assert stats[0]["param_checksum"] == stats[1]["param_checksum"]

    # The evaluator ran on rank 0 only: before training, at steps 4 and 8.
    assert stats[0]["evaluations_run"] == 3 and stats[1]["evaluations_run"] == 0

    # Outputs: metrics before/after, throughput, a loadable CrossEncoder directory.
    assert set(summary["metrics_before"]) >= {"accuracy", "f1_macro"}
    assert set(summary["metrics_after"]) >= {"accuracy", "f1_macro"}
    assert summary["train_samples_per_second"] > 0 and summary["wall_time_s"] > 0
    assert summary["best_checkpoint"]["eval_accuracy"] is not None
    final = Path(outcome.final_dir)
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in final.iterdir()}
    assert not any(p.name.startswith(("optimizer", "rng_state", "trainer_state")) for p in final.iterdir())
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(str(final))
    assert model.num_labels == 3 and model.config.id2label[2] == "contradiction"
    assert model.predict([("A man sleeps.", "A person rests.")]).shape == (1, 3)
    assert not list(out.glob(".tmp-*"))  # nothing half-written left behind

    # Its model card: sentence-transformers' (filled in by the trainer on rank 0) plus what the run knows.
    from huggingface_hub import ModelCard

    card = ModelCard.load(final / "README.md")
    assert card.data.base_model == Path(tiny_model).name and card.data.library_name == "sentence-transformers"
    assert card.data.pipeline_tag == "text-classification"
    assert {"ce-ray", "generated_from_trainer", "loss:CrossEntropyLoss", "dataset_size:256"} <= set(card.data.tags)
    results = {(r.dataset_split, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results[("eval", "accuracy")] == pytest.approx(summary["metrics_final"]["accuracy"])  # no test rows: eval only
    assert card.data.datasets is None  # local files: named in the text, not hub ids
    text = card.text
    assert f"| train | `{nli_files['train']}` | 256 |" in text and f"| eval | `{nli_files['dev']}` | 96 |" in text
    assert "| Batch size | 32 (16 per worker x 2 workers) |" in text and "| Learning rate | 0.001 |" in text
    assert "| This model | the best checkpoint by eval accuracy, step " in text
    before, after = summary["metrics_before"]["accuracy"], summary["metrics_final"]["accuracy"]
    assert f"| **accuracy** | {before:.4f} | {after:.4f} |" in text
    assert "#### train.parquet" in text and "* Size: 256 training samples" in text  # the trainer's own parts

    # Tracked training (run.report_to: tensorboard by default): rank 0 alone wrote one event file, with the
    # loss and learning rate per logging step and the eval metrics, read back with TensorBoard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert len(events) == 1, events
    scalars = EventAccumulator(str(events[0])).Reload()
    tags = set(scalars.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "eval/accuracy", "eval/f1_macro"} <= tags, tags
    assert [e.step for e in scalars.Scalars("eval/accuracy")] == [0, 4, 8]
    assert [e.step for e in scalars.Scalars("train/loss")] == [4, 8]  # every min(run.checkpoint_every, 50) steps
    assert [e.step for e in scalars.Scalars("train/samples_per_second")] == [4, 8]
    assert all(e.value > 0 for e in scalars.Scalars("train/samples_per_second"))


def _registered_checkpoint(snapshot: Path) -> bool:
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being written
        return False


def test_killed_worker_restarts_from_checkpoint_and_finishes(tiny_model, nli_files, tmp_path, ray_session):
    """Kill a training worker by pid after the first checkpoint; Ray restarts the group and finishes."""
    out = tmp_path / "run"
    # 256 rows / batch 16 = 16 steps per epoch, 6 epochs = 96 steps when nothing goes wrong.
    job = nli_job(
        tiny_model, nli_files, out, "train.batch_size=16", "train.epochs=6", "run.checkpoint_every=8", "run.max_failures=2"
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("outcome", run_training(job)))
    thread.start()

    # Wait until Ray has registered a checkpoint (its snapshot names it), not just until files appear.
    deadline = time.time() + 180
    snapshot = out / "t" / "checkpoint_manager_snapshot.json"
    while time.time() < deadline and not _registered_checkpoint(snapshot):
        assert thread.is_alive(), "training ended before a checkpoint was registered"
        time.sleep(0.2)
    stats = worker_stats(out)
    assert stats and stats[0]["status"] == "running"
    victim = stats[0]["pid"]
    assert victim in ray_process_pids("RayTrainWorker")
    os.kill(victim, signal.SIGKILL)

    thread.join(timeout=300)
    assert not thread.is_alive()
    summary = result["outcome"].summary
    assert summary["steps_per_worker"] == [96]  # the uninterrupted count
    final_stats = worker_stats(out)[0]
    assert final_stats["pid"] != victim and final_stats["resumed"] is True
    assert 0 < final_stats["steps_this_attempt"] < 96  # it did not start over


def test_rerunning_the_same_run_name_resumes(tiny_model, nli_files, tmp_path, ray_session):
    out = tmp_path / "run"
    first = run_training(nli_job(tiny_model, nli_files, out, "train.max_steps=6", "run.checkpoint_every=3"))
    assert first.summary["steps_per_worker"] == [6]
    assert worker_stats(out)[0]["resumed"] is False

    # Same output_dir and run.name, longer budget: continues from step 6 instead of starting over.
    second = run_training(nli_job(tiny_model, nli_files, out, "train.max_steps=12", "run.checkpoint_every=3"))
    stats = worker_stats(out)[0]
    assert stats["resumed"] is True
    assert stats["steps_this_attempt"] == 6
    assert second.summary["steps_per_worker"] == [12]
    # the baseline (before any training) survives the resume
    assert second.summary["metrics_before"] == first.summary["metrics_before"]

    # Another learning rate and loss under the same name: refused before any work, naming what changed ...
    changed = nli_job(tiny_model, nli_files, out, "train.max_steps=12", "train.learning_rate=5e-4",
                      "train.loss={name: CrossEntropyLoss, label_smoothing: 0.1}")  # fmt: skip
    with pytest.raises(ConfigError, match=r"run.name: 't' .* was started with other settings \(changed: "
                       r"train.learning_rate, train.loss.label_smoothing\); .* --restart"):  # fmt: skip
        run_training(changed)
    # ... unless asked to start over
    third = run_training(changed.model_copy(update={"run": changed.run.model_copy(update={"restart": True})}))
    assert worker_stats(out)[0]["resumed"] is False and third.summary["steps_per_worker"] == [12]
