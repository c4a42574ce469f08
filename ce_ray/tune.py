"""Hyperparameter search: Ray Tune runs one Ray Train ``TorchTrainer`` per trial.

Run it::

    ce-ray tune jobs/nli_tune.yaml
    ce-ray tune jobs/rerank_tune.yaml --set tune.num_samples=32 --set scaling.use_gpu=true

How it fits together (Train V2 pattern): each trial is a small driver function that applies the
sampled values to the job and calls :func:`ce_ray.train.make_trainer`, so a trial is itself a
(multi-worker, DDP) training run. ``TuneReportCallback`` forwards every evaluation (each
``run.checkpoint_every`` steps) to Tune, so ASHA can stop weak trials early; the trial's run name
is its trial id, so a restarted trial resumes its own checkpoints.

Features, with the key that controls each:

- Search space ``tune.search_space`` ({dotted key: domain}); default per task: learning rate
  log-uniform 1e-6..1e-4, batch size, and the loss (rerank: BCE, MNRL, LambdaLoss, ListNet, plus
  MSE/MarginMSE when the data has teacher scores; nli: plain, label-smoothed and class-weighted
  cross-entropy). Each trial's data is shaped for its loss; rows are checked, and negatives mined,
  once, before Ray starts.
- ``tune.search``: Optuna TPE (default; random for the first ``tune.startup_trials``, by default a
  third of the search), random, grid; ``tune.scheduler``: ASHA (grace period in
  evaluation rounds) or none; ``tune.max_concurrent_trials`` (default: what the cluster fits given
  ``scaling``; fractional ``scaling.gpus_per_worker`` packs several trials on one GPU).
- Metric/mode from the task (``eval_accuracy``, ``eval_ndcg@10``), overridable.
- Results in ``run.output_dir``: ``best/`` (model of the best checkpoint of the best trial, or of its
  refit), ``best.json`` (config, metric, trial id, checkpoint, test score, the retriever baseline and
  the verdict), ``trials.csv``, ``report/`` (plots, Markdown/HTML).
- ``tune.refit``: after the search, the best trial's config is trained once more with
  ``tune.refit_set`` applied (by default on all of ``data.train``: search on a slice, train the
  winner on everything) under ``<output_dir>/refit``; it becomes ``best/`` unless it scores lower
  on the eval rows than the trial. Its rows are checked (and negatives mined) before Ray starts.
- Rerank: the retriever baseline (``eval.baseline``) is scored on the same eval and test rows.
- TensorBoard logs under ``<output_dir>/<run.name>/``; MLflow with ``tune.mlflow_uri``.
- Resilience: crashed trials are retried (``tune.max_failures``; inside a trial, worker failures
  restart from its checkpoint per ``run.max_failures``); re-running with the same ``run.name``
  restores the experiment and does not redo finished trials.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray import tune

from ce_ray import storage
from ce_ray.config import ConfigError, JobConfig, apply_override, job_from_dict
from ce_ray.modeling import check_model
from ce_ray.prepare import check_batch_fits, prepare_split
from ce_ray.runtime import ensure_ray
from ce_ray.tasks import TASKS

__all__ = ["TuneOutcome", "default_search_space", "run_tuning", "search_space"]

logger = logging.getLogger(__name__)

DOMAINS = ("loguniform", "uniform", "choice", "grid", "randint")
# The trial's driver function only waits on its Ray Train workers, which hold the real resources. Tune
# needs a non-empty request for it; a CPU sliver would make a trial whose workers take every CPU of the
# cluster wait forever for its own driver, so it asks for a MiB of Ray's logical memory instead.
DRIVER_RESOURCES = {"CPU": 0, "memory": 2**20}


# --------------------------------------------------------------------------------------------
# search space
# --------------------------------------------------------------------------------------------
def default_search_space(job: JobConfig, has_scores: bool = False) -> dict[str, Any]:
    """The search space used when ``tune.search_space`` is not set."""
    batches = [b for b in (16, 32, 64) if b % job.scaling.num_workers == 0] or [job.train.batch_size]
    if job.task == "nli":
        losses: list[Any] = [
            "CrossEntropyLoss",
            {"name": "CrossEntropyLoss", "label_smoothing": 0.1},
            {"name": "CrossEntropyLoss", "class_weights": "balanced"},
        ]
    else:
        losses = ["BinaryCrossEntropyLoss", "CachedMultipleNegativesRankingLoss", "LambdaLoss", "ListNetLoss"]
        if has_scores:
            losses += ["MSELoss", "MarginMSELoss"]
    return {
        # rerank: a fresh 1-output head on a small model takes larger steps than an NLI head
        "train.learning_rate": {"loguniform": [1e-6, 1e-4] if job.task == "nli" else [5e-6, 3e-4]},
        "train.batch_size": {"choice": batches},
        "train.loss": {"choice": losses},
    }


def _encode(value: Any) -> Any:
    """Categorical values go to searchers as primitives: mappings become JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith(("{", "[")):
        return json.loads(value)
    return value


def _validate_space(job: JobConfig, space: dict[str, Any]) -> None:
    """Every key exists and every value it may take gives a valid job; all problems at once."""
    errors: list[str] = []
    base = job.to_dict()
    for key, spec in space.items():
        prefix = f"tune.search_space.{key}"
        if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS:
            kind, arg = next(iter(spec.items()))
            if kind in ("loguniform", "uniform", "randint"):
                if not (isinstance(arg, list) and len(arg) == 2 and all(isinstance(a, (int, float)) for a in arg)):
                    errors.append(f"{prefix}: {kind} takes [low, high], got {arg!r}")
                    continue
                if arg[0] >= arg[1] or (kind == "loguniform" and arg[0] <= 0):
                    errors.append(f"{prefix}: {kind} needs 0 < low < high" if kind == "loguniform" else f"{prefix}: needs low < high")
                    continue
                samples = [arg[0], arg[1] - (1 if kind == "randint" else 0)]
            else:
                if not isinstance(arg, list) or not arg:
                    errors.append(f"{prefix}: {kind} takes a non-empty list of values, got {arg!r}")
                    continue
                samples = arg
        else:
            samples = [spec]
        for value in samples:
            raw = copy.deepcopy(base)
            try:
                apply_override(raw, key, value)
                job_from_dict(raw)
            except ConfigError as exc:
                errors.extend(f"{prefix} = {value!r}: {e}" for e in exc.errors)
    if errors:
        raise ConfigError(errors)


def search_space(job: JobConfig, has_scores: bool = False) -> dict[str, Any]:
    """The validated search space of a job (``tune.search_space`` or the task default)."""
    space = job.tune.search_space or default_search_space(job, has_scores)
    _validate_space(job, space)
    if job.tune.search == "grid":
        bad = [k for k, v in space.items() if isinstance(v, dict) and next(iter(v), None) in ("loguniform", "uniform", "randint")]
        if bad:
            raise ConfigError([f"tune.search_space.{k}: grid search needs choice/grid values, not a range" for k in bad])
    elif job.tune.search == "optuna":
        bad = [k for k, v in space.items() if isinstance(v, dict) and next(iter(v), None) == "grid"]
        if bad:
            raise ConfigError([f"tune.search_space.{k}: Optuna cannot search a grid; use choice, or tune.search: grid" for k in bad])
    return space


def _tune_domains(space: dict[str, Any], search: str) -> dict[str, Any]:
    from ray import tune

    param_space: dict[str, Any] = {}
    for key, spec in space.items():
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS):
            param_space[key] = _encode(spec)
            continue
        kind, arg = next(iter(spec.items()))
        if kind == "loguniform":
            param_space[key] = tune.loguniform(*arg)
        elif kind == "uniform":
            param_space[key] = tune.uniform(*arg)
        elif kind == "randint":
            param_space[key] = tune.randint(*arg)
        elif kind == "grid" or (kind == "choice" and search == "grid"):
            param_space[key] = tune.grid_search([_encode(v) for v in arg])
        else:
            param_space[key] = tune.choice([_encode(v) for v in arg])
    return param_space


def trial_job(base: dict[str, Any], params: dict[str, Any]) -> JobConfig:
    """The job of one trial: the base job with the sampled values applied."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        apply_override(raw, key, _decode(value))
    return job_from_dict(raw)


# --------------------------------------------------------------------------------------------
# the trial
# --------------------------------------------------------------------------------------------
def _trial_driver(params: dict[str, Any], base_job: dict[str, Any], trials_dir: str) -> None:
    """One trial: a Ray Train run of the base job with ``params`` applied."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ce_ray.prepare import prepare_data
    from ce_ray.train import make_trainer

    job = trial_job(base_job, params)
    prepared = prepare_data(job)  # cached: checked/shaped (and mined) before the experiment started
    trial_id = ray.tune.get_context().get_trial_id()
    trainer = make_trainer(
        job,
        prepared,
        name=_trial_name(trial_id),
        storage_path=trials_dir,
        stats_dir=_trial_stats_dir(trials_dir, trial_id),
        callbacks=[TuneReportCallback()],
    )
    trainer.fit()


def _trial_name(trial_id: str) -> str:
    return f"trial-{trial_id}"  # no timestamps: restarts resume


def _trial_stats_dir(trials_dir: str, trial_id: str) -> str:
    return storage.join(trials_dir, _trial_name(trial_id), "workers")


class _ReleaseWorkerGroups(tune.Callback):
    """Remove the placement group of a trial's Ray Train workers once the trial is over.

    When Tune stops a trial (ASHA) it kills the trial's driver; Train V2's controller dies with it,
    but the placement group it made for the workers lives as long as the Tune driver's job
    (ray-project/ray#54305), so every stopped trial would keep its CPUs/GPUs and later trials wait
    forever. The same holds when a trial's driver crashes (e.g. the node's OOM killer took it) and
    Tune retries the trial: the retry would wait for the CPUs/GPUs of its own dead attempt. Each
    worker records its placement group in the trial's worker stats; this removes it.
    """

    def __init__(self, trials_dir: str, base_job: dict[str, Any]):
        self.trials_dir = trials_dir
        self.base_job = base_job

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_recover(self, iteration, trials, trial, **info):
        self._release(trial)  # before the retry starts: the stats still name the failed attempt's group

    def _release(self, trial) -> None:
        from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

        from ce_ray.train import read_worker_stats

        world_size = trial_job(self.base_job, trial.config).scaling.num_workers
        for stats in read_worker_stats(_trial_stats_dir(self.trials_dir, trial.trial_id), world_size):
            pg_id = stats.get("placement_group_id")
            if not pg_id:
                continue
            pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
            if placement_group_table(pg).get("state") not in (None, "REMOVED"):
                logger.info("trial %s: releasing its workers' placement group %s", trial.trial_id, pg_id)
                remove_placement_group(pg)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------
@dataclass
class TuneOutcome:
    best: dict[str, Any]
    best_dir: str
    trials: list[dict[str, Any]]
    report_dir: str


def _values_in_space(space: dict[str, Any], key: str, default: Any) -> list[Any]:
    """Every value a categorical key of the space can take (its fixed value, or the job's own when absent)."""
    spec = space.get(key)
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("choice", "grid"):
        return list(next(iter(spec.values())))
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) == "randint":
        return [spec["randint"][1] - 1]  # the largest
    return [spec] if spec is not None else [default]


def _prepare_all(job: JobConfig, space: dict[str, Any], key: str = "tune.search_space") -> None:
    """Check rows, shape them for every loss in the space and mine negatives, before Ray starts."""
    prepare_split(job, "eval")
    errors: list[str] = []
    base = job.to_dict()
    batches = _values_in_space(space, "train.batch_size", job.train.batch_size)
    for loss in _values_in_space(space, "train.loss", job.loss.model_dump(exclude_none=True)):
        trial = trial_job(base, {"train.loss": _encode(loss)})
        try:
            split = prepare_split(trial, "train")
            for batch in batches:
                check_batch_fits(split.rows, batch, trial.data.train.describe(), key=f"{key}.train.batch_size = {batch}")
        except ConfigError as exc:
            errors.extend(f"{key}.train.loss = {loss!r}: {e}" for e in exc.errors)
    if errors:
        raise ConfigError(errors)


def _has_scores(job: JobConfig) -> bool:
    if job.task != "rerank" or job.data.train is None:
        return False
    from ce_ray.data import read_source

    names = set(read_source(job.data.train, "data.train").column_names)
    return "score" in names or "score" in job.data.train.columns


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


def startup_trials(job: JobConfig) -> int:
    """Random trials before TPE starts modelling: ``tune.startup_trials``, else a third of the search (2..10).

    Optuna's default of 10 random trials would leave every search of up to 10 trials purely random.
    """
    if job.tune.startup_trials is not None:
        return job.tune.startup_trials
    return max(2, min(10, job.tune.num_samples // 3))


def _build_searcher(job: JobConfig, metric: str, mode: str, max_concurrent: int):
    """Optuna TPE, or Tune's random/grid generator (which takes the concurrency cap itself)."""
    from ray.tune.search import BasicVariantGenerator

    points = [{k: _encode(v) for k, v in p.items()} for p in job.tune.points_to_evaluate] or None
    if job.tune.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(n_startup_trials=startup_trials(job), seed=job.tune.seed)
        return OptunaSearch(metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points)
    return BasicVariantGenerator(random_state=job.tune.seed, points_to_evaluate=points, max_concurrent=max_concurrent)


def run_tuning(job: JobConfig) -> TuneOutcome:
    """Search hyperparameters for a job and publish the best model (see module docstring).

    Raises:
        ConfigError / DataError: before Ray starts, for a bad config, search space or rows.
    """
    from ray import tune
    from ray.train import Checkpoint
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from ce_ray import report
    from ce_ray.train import best_by, model_quality, score_baseline, staged_model

    started = time.time()
    job.require_data("train", "eval")
    out = storage.resolve_uri(job.run.output_dir)
    job = job.model_copy(deep=True)
    job.run.output_dir = out
    task = TASKS[job.task]
    metric = job.tune.metric or task.tune_metric
    mode = job.tune.mode or task.mode

    # [1] Everything that can fail on the config or data fails here, before Ray starts.
    check_model(job.model)
    space = search_space(job, has_scores=_has_scores(job))
    _prepare_all(job, space)
    test_split = prepare_split(job, "test") if job.data.test is not None else None
    if job.tune.refit:
        _prepare_all(refit_job(job, job), space, key="tune.refit_set")
    score_baseline(job, prepare_split(job, "eval"), test_split)

    # [2] The experiment: one driver function per trial, restored when this run.name exists.
    ensure_ray()
    trials_dir = storage.join(out, f"{job.run.name}-trials")
    trainable = tune.with_resources(
        tune.with_parameters(_trial_driver, base_job=job.to_dict(), trials_dir=trials_dir),
        DRIVER_RESOURCES,
    )
    experiment = storage.join(out, job.run.name)
    if tune.Tuner.can_restore(experiment):
        logger.info("resuming tune experiment %s (finished trials are kept)", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        rows = prepare_split(job, "train").rows
        scheduler = (
            ASHAScheduler(
                time_attr="training_iteration",
                max_t=_rounds_upper_bound(job, space, rows),
                grace_period=job.tune.grace_period,
                reduction_factor=job.tune.reduction_factor,
            )
            if job.tune.scheduler == "asha"
            else FIFOScheduler()
        )
        concurrency = _max_concurrent(job)
        callbacks: list = [_ReleaseWorkerGroups(trials_dir, job.to_dict())]
        if job.tune.mlflow_uri:
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            callbacks.append(MLflowLoggerCallback(tracking_uri=job.tune.mlflow_uri, experiment_name=job.run.name))
        tuner = tune.Tuner(
            trainable,
            param_space=_tune_domains(space, job.tune.search),
            tune_config=tune.TuneConfig(
                metric=metric,
                mode=mode,
                search_alg=_build_searcher(job, metric, mode, concurrency),
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
    results = tuner.fit()

    # [3] Trials table, best model, test score, report.
    trials = report.trial_rows(results, metric, mode, space)
    ok = [t for t in trials if t["best_checkpoint"]]
    if not ok:
        errors = "; ".join(f"{t['trial_id']}: {t['error']}" for t in trials if t["error"]) or "no trial reported a checkpoint"
        raise RuntimeError(f"tune: no trial finished an evaluation ({errors})")
    best_trial = best_by(ok, f"best_{metric}", mode)
    best_job = trial_job(job.to_dict(), {k: _encode(v) for k, v in best_trial["params"].items()})
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

    # [4] The exported model: the best trial's best checkpoint, or its refit on all the data (tune.refit)
    #     when that scores at least as well on the eval rows. Both carry their test score and the baseline.
    with staged_model(Checkpoint(best_trial["best_checkpoint"])) as model_dir:
        best["trial_quality"] = model_quality(best_job, model_dir, best_trial["best_metrics"], test_split)
        refit = _refit(job, best_job, best_trial, metric, mode) if job.tune.refit else None
        best["refit"] = refit
        best["exported"] = "refit" if refit and refit["chosen"] else "trial"
        source = storage.download_dir(refit["final_model"]) if best["exported"] == "refit" else model_dir
        best_dir = storage.publish_dir(source, storage.join(out, "best"))
    quality = refit["quality"] if best["exported"] == "refit" else best["trial_quality"]
    best["best_dir"] = best_dir
    best["baseline"] = quality["baseline"]
    best["verdict"] = quality["verdict"]
    if quality["model"]["test"] is not None:
        best["test_metrics"] = quality["model"]["test"]
        best["test_score"] = best["test_metrics"].get(task.primary_metric)
    best["wall_time_s"] = time.time() - started
    report_dir = report.write_report(out, trials, best, metric)
    storage.write_json(storage.join(out, "best.json"), best)
    return TuneOutcome(best=best, best_dir=best_dir, trials=trials, report_dir=report_dir)


def refit_job(job: JobConfig, trial: JobConfig) -> JobConfig:
    """The best trial's job with ``tune.refit_set`` applied, trained under ``<output_dir>/refit``."""
    raw = trial.to_dict()
    for key, value in job.tune.refit_set.items():
        apply_override(raw, key, value)
    apply_override(raw, "run.output_dir", storage.join(job.run.output_dir, "refit"))
    apply_override(raw, "run.name", f"{job.run.name}-refit")
    try:
        return job_from_dict(raw, "tune.refit_set")
    except ConfigError as exc:
        raise ConfigError([f"tune.refit_set: {e}" for e in exc.errors]) from None


def _refit(job: JobConfig, best_job: JobConfig, best_trial: dict[str, Any], metric: str, mode: str) -> dict[str, Any]:
    """Train the best trial's config again with ``tune.refit_set``; chosen when it is not worse on the eval rows."""
    from ce_ray.baseline import read_model_quality
    from ce_ray.train import run_training

    started = time.time()
    outcome = run_training(refit_job(job, best_job))
    plain = metric.removeprefix("eval_")
    refit_value = outcome.summary["metrics_final"].get(plain)
    trial_value = best_trial[f"best_{metric}"]
    sign = 1 if mode == "max" else -1
    chosen = refit_value is not None and sign * refit_value >= sign * trial_value
    logger.info("refit: eval %s %.4f vs best trial %.4f -> exporting the %s", plain, refit_value or float("nan"), trial_value, "refit" if chosen else "trial")
    quality = read_model_quality(storage.download_dir(outcome.final_dir))
    return {
        "set": job.tune.refit_set,
        "final_model": outcome.final_dir,
        "summary_path": outcome.summary_path,
        "train_rows": outcome.summary["train_rows"],
        "eval_value": refit_value,
        "chosen": chosen,
        "quality": quality,
        "wall_time_s": time.time() - started,
    }


