"""Hyperparameter search: Ray Tune runs one Ray Train ``TorchTrainer`` per trial.

Run it::

    ce-ray tune jobs/nli_tune.yaml
    ce-ray tune jobs/rerank_tune.yaml --set tune.num_samples=32 --set scaling.use_gpu=true

How it fits together (Train V2 pattern): each trial is a small driver function that applies the
sampled values to the job and calls :func:`ce_ray.training.make_trainer`, so a trial is itself a
(multi-worker, DDP) training run. ``TuneReportCallback`` forwards every evaluation (each
``run.checkpoint_every`` steps) to Tune, so ASHA can stop weak trials early; the trial's run name
is its trial id, so a restarted trial resumes its own checkpoints. In a console session, rank 0 of each
trial sends its step progress through one queue of the driver's (:class:`ce_ray.console.SearchProgress`),
printed as ``ce-ray train`` prints it, headed by the trial id.

Features, with the key that controls each:

- Search space ``tune.search_space`` ({dotted key: domain}, :mod:`ce_ray.tuning.space`); default
  per task: learning rate log-uniform (nli 1e-6..1e-4, rerank 5e-6..3e-4), batch size, and the
  losses the registry marks ``default_search`` (rerank: BCE, CachedMNRL, LambdaLoss, ListNet, plus
  MSE/MarginMSE when the data has teacher scores; nli: plain, label-smoothed and class-weighted
  cross-entropy). Each trial's data is shaped for its loss; rows are checked, and negatives mined,
  once, before Ray starts.
- ``tune.search``: Optuna TPE (default; random for the first ``tune.startup_trials``, by default a
  third of the search), random, grid; ``tune.scheduler``: ASHA (grace period in
  evaluation rounds) or none; ``tune.max_concurrent_trials`` (default: what the cluster fits given
  ``scaling``; fractional ``scaling.gpus_per_worker`` packs several trials on one GPU).
- Metric/mode from the task (``eval_accuracy``, ``eval_ndcg@10``), overridable.
- Results in ``run.output_dir``: ``best/`` (model of the best checkpoint of the best trial, or of its
  refit, with a model card that adds the search: trials, metric, best hyperparameters), ``best.json``
  (config, metric, trial id, checkpoint, test score, the retriever baseline and the verdict),
  ``trials.csv``, ``report/`` (plots, Markdown/HTML).
- ``tune.refit``: after the search, the best trial's config is trained once more with
  ``tune.refit_set`` applied (by default on all of ``data.train``: search on a slice, train the
  winner on everything) under ``<output_dir>/refit``; it becomes ``best/`` unless it scores lower
  on the eval rows than the trial. Its rows are checked (and negatives mined) before Ray starts.
- Rerank: the retriever baseline (``eval.baseline``) is scored on the same eval and test rows.
- TensorBoard logs under ``<output_dir>/<run.name>/``; MLflow with ``tune.mlflow_uri``.
- Resilience: crashed trials are retried (``tune.max_failures``; inside a trial, worker failures
  restart from its checkpoint per ``run.max_failures``); re-running with the same ``run.name``
  restores the experiment and does not redo finished trials; a refit that was under way continues from
  its last checkpoint when the same config wins again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from ce_ray import console, storage
from ce_ray.config import ConfigError, JobConfig
from ce_ray.data.prepare import PreparedSplit, check_batch_fits, prepare_split
from ce_ray.modeling import check_model
from ce_ray.quality import model_quality, read_model_quality, score_baseline
from ce_ray.runs import check_run_identity, same_run
from ce_ray.runtime import ensure_ray
from ce_ray.tasks import TASKS, best_by
from ce_ray.tuning import report
from ce_ray.training.card import SearchSummary, add_search_summary, write_model_card
from ce_ray.training.checkpoint import staged_model
from ce_ray.training.driver import hyperparameters
from ce_ray.tuning.space import build_searcher, encode, refit_job, search_space, trial_job, tune_domains, values_in_space

__all__ = ["TuneOutcome", "run_tuning"]

logger = logging.getLogger(__name__)

# The trial's driver function only waits on its Ray Train workers, which hold the real resources. Tune
# needs a non-empty request for it; a CPU sliver would make a trial whose workers take every CPU of the
# cluster wait forever for its own driver, so it asks for a MiB of Ray's logical memory instead.
DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}


@dataclass
class TuneOutcome:
    best: dict[str, Any]
    best_dir: str
    trials: list[dict[str, Any]]
    report_dir: str


# --------------------------------------------------------------------------------------------
# [1] before Ray: everything that can fail on the config or the data
# --------------------------------------------------------------------------------------------
def _prepare_all(job: JobConfig, space: dict[str, Any], key: str = "tune.search_space") -> PreparedSplit:
    """Check rows, shape them for every loss in the space and mine negatives, before Ray starts; the eval split."""
    eval_split = prepare_split(job, "eval")
    errors: list[str] = []
    base = job.to_dict()
    batches = values_in_space(space, "train.batch_size", job.train.batch_size)
    for loss in values_in_space(space, "train.loss", job.loss.model_dump(exclude_none=True)):
        trial = trial_job(base, {"train.loss": encode(loss)})
        try:
            split = prepare_split(trial, "train")
            for batch in batches:
                check_batch_fits(split.rows, batch, trial.data.describe_train(), key=f"{key}.train.batch_size = {batch}")
        except ConfigError as exc:
            errors.extend(f"{key}.train.loss = {loss!r}: {e}" for e in exc.errors)
    if errors:
        raise ConfigError(errors)
    return eval_split


def _has_scores(job: JobConfig) -> bool:
    if job.task != "rerank" or job.data.train is None:
        return False
    from ce_ray.data.read import read_source

    return any(
        "score" in src.columns or "score" in read_source(src, job.data.train_key(i)).column_names
        for i, src in enumerate(job.data.train_sources)
    )


def _check_before_ray(job: JobConfig) -> tuple[dict[str, Any], PreparedSplit, PreparedSplit | None]:
    """The validated space and the prepared eval/test rows; every loss's train rows shaped and cached."""
    check_model(job.model)
    space = search_space(job, has_scores=_has_scores(job))
    eval_split = _prepare_all(job, space)
    test_split = prepare_split(job, "test") if job.data.test is not None else None
    if job.tune.refit:
        # for_run, as the refit's run_training does: a relative path in refit_set keys the same prepared data
        _prepare_all(refit_job(job, job).for_run(), space, key="tune.refit_set")
    score_baseline(job, eval_split, test_split)
    return space, eval_split, test_split


# --------------------------------------------------------------------------------------------
# [2] the experiment: one driver function per trial
# --------------------------------------------------------------------------------------------
def _trial_name(trial_id: str) -> str:
    return f"trial-{trial_id}"  # no timestamps: restarts resume


def _trial_stats_dir(trials_dir: str, trial_id: str) -> str:
    return storage.join(trials_dir, _trial_name(trial_id), "workers")


def _trial_driver(params: dict[str, Any], base_job: dict[str, Any], trials_dir: str, progress=None) -> None:
    """One trial: a Ray Train run of the base job with ``params`` applied; ``progress``: the queue of the
    console's :class:`~ce_ray.console.SearchProgress` (or None), rank 0's events tagged with the trial id."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ce_ray.data.prepare import prepare_data
    from ce_ray.training import make_trainer

    job = trial_job(base_job, params)
    prepared = prepare_data(job)  # cached: checked/shaped (and mined) before the experiment started
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = make_trainer(
        job,
        prepared,
        name=_trial_name(trial_id),
        storage_path=trials_dir,
        stats_dir=_trial_stats_dir(trials_dir, trial_id),
        log_dir=storage.join(trials_dir, _trial_name(trial_id), "tensorboard"),
        callbacks=[TuneReportCallback()],
        progress=console.TrialEvents(progress, trial_id) if progress is not None else None,
    )
    trainer.fit()


def _max_concurrent(job: JobConfig) -> int:
    import ray

    if job.tune.max_concurrent_trials:
        return job.tune.max_concurrent_trials
    resources = ray.cluster_resources()
    s = job.scaling
    cpu_fits = resources.get("CPU", 1) / (s.num_workers * s.cpus_per_worker)
    fits = min(cpu_fits, resources.get("GPU", 0) / (s.num_workers * s.gpus_per_worker)) if s.use_gpu else cpu_fits
    return max(1, min(job.tune.num_samples, int(math.floor(fits + 1e-9))))


def _rounds_upper_bound(job: JobConfig, space: dict[str, Any], train_rows: int) -> int:
    """Most evaluation rounds any trial can run (ASHA's max_t)."""
    smallest_batch = job.train.batch_size
    spec = space.get("train.batch_size")
    if isinstance(spec, dict) and next(iter(spec), None) in ("choice", "grid"):
        smallest_batch = min(next(iter(spec.values())))
    steps = job.train.max_steps if job.train.max_steps > 0 else math.ceil(train_rows / smallest_batch * job.train.epochs)
    return max(job.tune.grace_period, math.ceil(steps / job.run.checkpoint_every) + 1)


def _tuner(job: JobConfig, space: dict[str, Any], metric: str, mode: str, progress=None):
    """The ``Tuner`` of this job: restored when ``run.name`` already has an experiment, else a new one;
    ``progress``: the queue the trials' rank 0 send their progress to (or None)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ce_ray.training.instrument import read_worker_stats
    from ce_ray.workarounds.ray_54305 import ReleaseWorkerGroups

    out = job.run.output_dir
    trials_dir = storage.join(out, f"{job.run.name}-trials")
    base = job.to_dict()
    trainable = tune.with_resources(
        tune.with_parameters(_trial_driver, base_job=base, trials_dir=trials_dir, progress=progress), DRIVER_RESOURCES
    )
    experiment = storage.join(out, job.run.name)
    if tune.Tuner.can_restore(experiment):
        console.say(f"tune: resuming the experiment {experiment} (finished trials are kept)")
        return tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)

    scheduler = FIFOScheduler()
    if job.tune.scheduler == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=_rounds_upper_bound(job, space, prepare_split(job, "train").rows),
            grace_period=job.tune.grace_period,
            reduction_factor=job.tune.reduction_factor,
        )
    concurrency = _max_concurrent(job)

    def worker_stats(trial):
        world_size = trial_job(base, trial.config).scaling.num_workers
        return read_worker_stats(_trial_stats_dir(trials_dir, trial.trial_id), world_size)

    callbacks: list = [ReleaseWorkerGroups(worker_stats)]
    if console.active() is not None:
        from ce_ray.tuning.progress import ConsoleProgress

        callbacks.append(ConsoleProgress(job.tune.num_samples, metric, mode, space))
    console.say(
        f"tune: {job.tune.num_samples} trials, up to {concurrency} at a time, {job.tune.search} search"
        + (", ASHA stops weak trials early" if job.tune.scheduler == "asha" else "")
        + f"; metric {metric} ({mode})"
    )
    if job.tune.mlflow_uri:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        callbacks.append(MLflowLoggerCallback(tracking_uri=job.tune.mlflow_uri, experiment_name=job.run.name))
    return tune.Tuner(
        trainable,
        param_space=tune_domains(space, job.tune.search),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            search_alg=build_searcher(job, metric, mode, concurrency),
            scheduler=scheduler,
            num_samples=job.tune.num_samples,
            # Optuna is wrapped in a ConcurrencyLimiter by Tune; the random/grid generator caps itself
            max_concurrent_trials=concurrency if job.tune.search == "optuna" else None,
        ),
        run_config=tune.RunConfig(
            name=job.run.name,
            storage_path=out,
            failure_config=tune.FailureConfig(max_failures=job.tune.max_failures),
            callbacks=callbacks,
        ),
    )


# --------------------------------------------------------------------------------------------
# [3] after the search: the best trial, its refit, the exported model
# --------------------------------------------------------------------------------------------
def _best_trial(job: JobConfig, trials: list[dict[str, Any]], metric: str, mode: str) -> tuple[dict[str, Any], JobConfig]:
    ok = [t for t in trials if t["best_checkpoint"]]
    if not ok:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials if t["error"]) or "no trial reported a checkpoint"
        raise RuntimeError(f"tune: no trial finished an evaluation ({errors})")
    best_trial = best_by(ok, f"best_{metric}", mode)
    return best_trial, trial_job(job.to_dict(), {k: encode(v) for k, v in best_trial["params"].items()})


def _refit(job: JobConfig, best_job: JobConfig, best_trial: dict[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """Train the best trial's config again with ``tune.refit_set``; chosen when it is not worse on the eval rows."""
    from ce_ray.training import run_training

    started = time.time()
    refit = refit_job(job, best_job)
    # A tune that was stopped during its refit continues that refit from its last checkpoint when the same
    # config won again; a refit of another config (or an older search's) starts over.
    run_dir = storage.join(refit.run.output_dir, refit.run.name)
    resume = same_run(refit, "train") and storage.exists(run_dir)
    refit = refit.model_copy(update={"run": refit.run.model_copy(update={"restart": not resume})})
    # Ray Train writes this snapshot when it registers a checkpoint: without it the refit starts at step 0 anyway
    checkpointed = resume and storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json"))
    verb = "resuming the refit of" if checkpointed else "training"
    console.say(f"refit: {verb} the best trial's config again with {json.dumps(job.tune.refit_set)}")
    outcome = run_training(refit, label="refit")
    plain = metric.removeprefix("eval_")
    refit_value = outcome.summary["metrics_final"].get(plain)
    trial_value = best_trial[f"best_{metric}"]
    sign = 1 if mode == "max" else -1
    chosen = refit_value is not None and sign * refit_value >= sign * trial_value  # a tie goes to the refit
    logger.info("refit: eval %s %.4f vs best trial %.4f -> exporting the %s", plain, refit_value or float("nan"), trial_value, "refit" if chosen else "trial")
    return {
        "set": job.tune.refit_set,
        "final_model": outcome.final_dir,
        "summary_path": outcome.summary_path,
        "train_rows": outcome.summary["train_rows"],
        "eval_value": refit_value,
        "chosen": chosen,
        "quality": read_model_quality(storage.download_dir(outcome.final_dir)),
        "wall_time_s": time.time() - started,
    }


def _write_trial_card(
    job: JobConfig,
    trial_job: JobConfig,
    trial: dict[str, Any],
    quality: dict[str, Any],
    model_dir: str,
    splits: dict[str, PreparedSplit | None],
) -> None:
    """The model card of the best trial's staged checkpoint, as ``ce-ray train`` writes it for ``final/``."""
    from ce_ray.training.instrument import read_worker_stats

    trials_dir = storage.join(job.run.output_dir, f"{job.run.name}-trials")
    workers = read_worker_stats(_trial_stats_dir(trials_dir, trial["trial_id"]), trial_job.scaling.num_workers)
    splits = {"train": prepare_split(trial_job, "train"), **splits}  # cached: prepared before the search
    write_model_card(
        model_dir,
        trial_job,
        quality=quality,
        metrics_before=trial["metrics_before"],
        hyperparameters=hyperparameters(trial_job, workers),
        rows={name: split.rows if split else None for name, split in splits.items()},
        step=trial["best_step"],
    )


def _search_summary(job: JobConfig, best: dict[str, Any], trial: dict[str, Any]) -> SearchSummary:
    refit = best.get("refit")
    return SearchSummary(
        trials=best["num_trials"],
        stopped_early=best["trials_stopped_early"],
        metric=best["metric"],
        mode=best["mode"],
        search=job.tune.search,
        scheduler=job.tune.scheduler,
        best_trial=best["trial_id"],
        best_step=best["step"],
        best_value=best["value"],
        params=trial["params"],
        exported=best["exported"],
        refit_value=refit["eval_value"] if refit else None,
        refit_set=refit["set"] if refit else None,
    )


def run_tuning(job: JobConfig) -> TuneOutcome:
    """Search hyperparameters for a job and publish the best model (see module docstring).

    Raises:
        ConfigError / DataError: before Ray starts, for a bad config, search space or rows.
    """
    from ray.train import Checkpoint

    started = time.time()
    job = job.for_run()
    out = job.run.output_dir
    task = TASKS[job.task]
    metric = job.tune.metric or task.tune_metric
    mode = job.tune.mode or task.mode

    # [1] Everything that can fail on the config or data fails here, before Ray starts; a run.name that
    #     exists is resumed only with the settings it was started with.
    experiment = storage.join(out, job.run.name)
    if job.run.restart:
        for uri in (experiment, storage.join(out, f"{job.run.name}-trials"), storage.join(out, "refit")):
            storage.delete_dir(uri)
    check_run_identity(job, "tune", started=storage.exists(experiment))
    space, eval_split, test_split = _check_before_ray(job)

    # [2] The experiment; each trial's rank 0 progress on the console, as ce-ray train shows it.
    ensure_ray()
    progress = console.search_progress(metric)
    with progress or contextlib.nullcontext():
        results = _tuner(job, space, metric, mode, progress.queue if progress else None).fit()

    # [3] The best trial, and its refit on all the data (tune.refit).
    trials = report.trial_rows(results, metric, mode, space)
    best_trial, best_job = _best_trial(job, trials, metric, mode)
    best = {
        "metric": metric,
        "mode": mode,
        "value": best_trial[f"best_{metric}"],
        "trial_id": best_trial["trial_id"],
        "step": best_trial["best_step"],
        "params": best_trial["params"],
        "loss": best_trial["loss"],
        "checkpoint_path": best_trial["best_checkpoint"],
        "job": best_job.to_dict(),
        "num_trials": len(trials),
        "trials_stopped_early": sum(t["status"] == "STOPPED_EARLY" for t in trials),
    }
    refit = _refit(job, best_job, best_trial, metric, mode) if job.tune.refit else None
    best["refit"] = refit
    best["exported"] = "refit" if refit and refit["chosen"] else "trial"

    # [4] The exported model: the best trial's best checkpoint, or the refit when it scores at least as
    #     well on the eval rows. Both carry their test score, the baseline and a model card with the search.
    with staged_model(Checkpoint(best_trial["best_checkpoint"])) as model_dir, tempfile.TemporaryDirectory() as tmp:
        best["trial_quality"] = model_quality(best_job, model_dir, best_trial["best_metrics"], eval_split, test_split)
        if best["exported"] == "refit":  # a copy of the refit's final/, whose card its training run wrote
            source = shutil.copytree(storage.download_dir(refit["final_model"]), os.path.join(tmp, "refit"))
        else:
            source = model_dir
            splits = {"eval": eval_split, "test": test_split}
            _write_trial_card(job, best_job, best_trial, best["trial_quality"], model_dir, splits)
        add_search_summary(source, _search_summary(job, best, best_trial))
        best_dir = storage.publish_dir(source, storage.join(out, "best"))
    quality = refit["quality"] if best["exported"] == "refit" else best["trial_quality"]
    best["best_dir"] = best_dir
    best["baseline"] = quality["baseline"]
    best["verdict"] = quality["verdict"]
    best["fusion"] = quality.get("fusion")  # "fused": reported next to the pure model, never instead of it
    if quality["model"]["test"] is not None:
        best["test_metrics"] = quality["model"]["test"]
        best["test_score"] = best["test_metrics"].get(task.primary_metric)
    best["wall_time_s"] = time.time() - started
    report_dir = report.write_report(out, trials, best, metric)
    storage.write_json(storage.join(out, "best.json"), best)
    return TuneOutcome(best=best, best_dir=best_dir, trials=trials, report_dir=report_dir)
