"""Train one job on Ray: prepare the data, fit a ``TorchTrainer``, publish ``final/`` and ``summary.json``.

Run it::

    ce-ray train jobs/nli_train.yaml
    ce-ray train jobs/rerank_train.yaml --set scaling.num_workers=4 --set scaling.use_gpu=true

Features, with the key that controls each:

- DDP on CPU (gloo) or GPU (NCCL) over ``scaling.num_workers`` workers. Each worker trains on its
  own shard (HF's distributed sampler over the memory-mapped prepared rows); the global batch
  ``train.batch_size`` is split evenly, so a 2-worker run takes half the steps per worker.
- Evaluation with the task's sentence-transformers evaluator before training, every
  ``run.checkpoint_every`` steps and at the end. The evaluator runs on rank 0; other ranks only
  lend their forward passes (sentence-transformers' distributed evaluation), and rank 0's metrics
  are what Ray Train and Tune see.
- Checkpoints (model, optimizer, scheduler, trainer state) at every evaluation, uploaded by rank 0
  to ``<run.output_dir>/<run.name>/``; the ``run.keep_checkpoints`` best by the eval metric are kept,
  plus the latest. With ``run.max_failures`` a failed worker group restarts from the latest
  checkpoint; re-running the same ``run.name`` resumes.
- Mixed precision (``train.precision``), TF32 on GPU.
- Outputs: ``<output_dir>/final/`` (a plain CrossEncoder directory, the best checkpoint by default, with a
  model card: :mod:`ce_ray.training.card`),
  ``<output_dir>/summary.json`` and per-worker statistics in ``<output_dir>/workers/``.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

from ce_ray import console, storage
from ce_ray.config import JobConfig
from ce_ray.data.prepare import PreparedData, prepare_data, prepare_split, sources_text
from ce_ray.modeling import check_model
from ce_ray.quality import model_quality, score_baseline
from ce_ray.runs import check_run_identity
from ce_ray.runtime import ensure_ray
from ce_ray.tasks import TASKS, plain_metrics
from ce_ray.training.card import write_model_card
from ce_ray.training.checkpoint import best_checkpoint, chosen_checkpoint, staged_model
from ce_ray.training.recipe import train_loop_per_worker

__all__ = ["TrainOutcome", "hyperparameters", "make_trainer", "run_training", "summarize"]


def make_trainer(
    job: JobConfig,
    prepared: PreparedData,
    *,
    name: str,
    storage_path: str,
    stats_dir: str,
    log_dir: str | None = None,
    callbacks: list | None = None,
    progress=None,
):
    """The ``TorchTrainer`` for one run (used by :func:`run_training` and by each tune trial); ``progress``: the
    queue of a :class:`ce_ray.console.TrainProgress` that rank 0 reports to."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = job.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    task = TASKS[job.task]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": job.to_dict(),
            "data": prepared.to_dict(),
            "stats_dir": stats_dir,
            "log_dir": log_dir,
            "progress": progress,
        },
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=s.num_workers,
            use_gpu=s.use_gpu,
            resources_per_worker=resources,
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=job.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=job.run.keep_checkpoints,
                checkpoint_score_attribute=task.tune_metric,
                checkpoint_score_order=task.mode,
            ),
            callbacks=callbacks or [],
        ),
    )


@dataclass
class TrainOutcome:
    """What :func:`run_training` returns: the summary written to ``summary.json`` and where things are."""

    summary: dict[str, Any]
    final_dir: str
    summary_path: str
    result: Any  # ray.train.Result


def hyperparameters(job: JobConfig, workers: list[dict[str, Any]]) -> dict[str, Any]:
    """The hyperparameters of a run as ``summary.json`` and the model card give them (precision: what rank 0 used)."""
    return {
        "learning_rate": job.train.learning_rate,
        "batch_size": job.train.batch_size,
        "per_worker_batch_size": job.train.batch_size // job.scaling.num_workers,
        "epochs": job.train.epochs,
        "max_steps": job.train.max_steps,
        "warmup_ratio": job.train.warmup_ratio,
        "weight_decay": job.train.weight_decay,
        "precision": workers[0].get("precision", job.train.precision) if workers else job.train.precision,
        "seed": job.train.seed,
    }


def summarize(job: JobConfig, result, prepared: PreparedData, workers: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """The ``summary.json`` of a run: task, loss, hyperparameters, metrics before/after, throughput."""
    metrics = dict(result.metrics or {})
    task = TASKS[job.task]
    before = plain_metrics(metrics, "baseline_")
    after = plain_metrics(metrics, "eval_")
    step_seconds = max((w.get("step_seconds") or 0.0) for w in workers) if workers else None
    rows = sum(w.get("rows_seen", 0) for w in workers)
    best = None
    if (found := best_checkpoint(job, result)) is not None:
        ckpt, best_metrics = found
        best = {
            "path": ckpt.path,
            "step": best_metrics.get("step"),
            task.tune_metric: best_metrics.get(task.tune_metric),
            "metrics": plain_metrics(best_metrics, "eval_"),
        }
    return {
        "task": job.task,
        "model": job.model.name,
        "loss": job.loss.label(),
        "hyperparameters": hyperparameters(job, workers),
        "primary_metric": task.primary_metric,
        "metrics_before": before,
        # the step-0 score read from an earlier run's, with the same model and eval rows (training.instrument)
        "metrics_before_reused": any(w.get("start_score_reused") for w in workers),
        "metrics_after": after,
        "improvement": (after.get(task.primary_metric, float("nan")) - before.get(task.primary_metric, float("nan")))
        if before and after
        else None,
        "world_size": job.scaling.num_workers,
        "use_gpu": job.scaling.use_gpu,
        "steps_per_worker": [w.get("global_step") for w in workers],
        "rows_per_worker": [w.get("rows_seen") for w in workers],
        "peak_rss_mib_per_worker": [round(w.get("peak_rss_mib") or 0) for w in workers],
        "peak_gpu_mem_gib_per_worker": [w.get("peak_gpu_mem_gib") for w in workers],
        "nodes": sorted({w.get("node_id") for w in workers if w.get("node_id")}),
        "train_rows": prepared.train.rows,
        "train_sources": prepared.train.sources,
        "eval_rows": prepared.eval.rows,
        "dropped_rows": {"train": prepared.train.dropped, "eval": prepared.eval.dropped},
        "train_samples_per_second": rows / step_seconds if step_seconds else None,
        "train_step_seconds": step_seconds,
        "wall_time_s": wall_s,
        "best_checkpoint": best,
        "early_stopped_at_step": workers[0].get("early_stopped_at_step") if workers else None,
        "checkpoint_dir": storage.join(job.run.output_dir, job.run.name),
        "run_name": job.run.name,
    }


def run_training(job: JobConfig, label: str = "train") -> TrainOutcome:
    """Train one job end to end: prepare data, fit on Ray, publish ``final/`` and ``summary.json``.

    In a :func:`ce_ray.console.session` rank 0's progress shows as a live line headed ``label``.

    Raises:
        ConfigError / DataError: before Ray starts, for a bad config or bad rows.
        ray.train.TrainingFailedError: when training fails beyond ``run.max_failures`` restarts.
    """
    started = time.time()
    job = job.for_run()
    out = job.run.output_dir

    # [1] Model config and data: checked, shaped and saved before any cluster work; a run.name that
    #     exists is resumed only with the settings it was started with.
    run_dir = storage.join(out, job.run.name)
    if job.run.restart:
        storage.delete_dir(run_dir)
    check_run_identity(job, "train", started=storage.exists(run_dir))
    check_model(job.model)
    console.say(f"{label}: checking and preparing the data")
    prepared = prepare_data(job)
    test_split = prepare_split(job, "test") if job.data.test is not None else None
    console.say(
        f"{label}: {prepared.train.rows} training rows, {prepared.eval.rows} eval rows"
        + (f", {test_split.rows} test rows" if test_split is not None else "")
    )
    if len(prepared.train.sources or ()) > 1:
        console.say(f"{label}: training rows per source ({job.data.mix}): {sources_text(prepared.train.sources)}")
    score_baseline(job, prepared.eval, test_split)

    # [2] Fit on Ray; rank 0's progress on the console.
    ensure_ray()
    stats_dir = storage.join(out, "workers")
    s = job.scaling
    console.say(
        f"{label}: {s.num_workers} worker(s) on {'GPU' if s.use_gpu else 'CPU'}, batch {job.train.batch_size} "
        f"({job.train.batch_size // s.num_workers} per worker), eval every {job.run.checkpoint_every} steps"
    )
    progress = console.train_progress(TASKS[job.task].tune_metric, label)
    with progress or contextlib.nullcontext():
        trainer = make_trainer(
            job, prepared, name=job.run.name, storage_path=out, stats_dir=stats_dir,
            log_dir=storage.join(out, "tensorboard"), progress=progress.queue if progress else None,
        )  # fmt: skip
        result = trainer.fit()

    # [3] Publish the final model (best or last checkpoint, with its test score, the retriever
    #     baseline and the model card inside) and the summary, both atomically.
    from ce_ray.training.instrument import read_worker_stats  # its module imports what the workers need

    workers = read_worker_stats(stats_dir, job.scaling.num_workers)
    summary = summarize(job, result, prepared, workers, time.time() - started)
    checkpoint = chosen_checkpoint(job, result)
    best = summary["best_checkpoint"] if job.run.final == "best" else None
    final_metrics = best["metrics"] if best else summary["metrics_after"]
    final_step = best["step"] if best else (result.metrics or {}).get("step")
    with staged_model(checkpoint) as model_dir:
        quality = model_quality(job, model_dir, final_metrics, prepared.eval, test_split)
        write_model_card(
            model_dir,
            job,
            quality=quality,
            metrics_before=summary["metrics_before"],
            hyperparameters=summary["hyperparameters"],
            rows={
                "train": prepared.train.rows, "eval": prepared.eval.rows, "test": test_split and test_split.rows,
                "train_sources": prepared.train.sources,
            },  # fmt: skip
            step=final_step,
        )
        final_dir = storage.publish_dir(model_dir, storage.join(out, "final"))
    summary["final_model"] = final_dir
    summary["final_checkpoint"] = job.run.final
    summary["metrics_final"] = final_metrics
    if quality["model"]["test"] is not None:
        summary["metrics_test"] = quality["model"]["test"]
        summary["test_rows"] = test_split.rows
    summary["baseline"] = quality["baseline"]
    summary["verdict"] = quality["verdict"]
    summary["fusion"] = quality.get("fusion")  # "fused": reported next to the pure model, never instead of it
    summary["wall_time_s"] = time.time() - started
    summary_path = storage.join(out, "summary.json")
    storage.write_json(summary_path, summary)
    return TrainOutcome(summary=summary, final_dir=final_dir, summary_path=summary_path, result=result)
