"""The search space: the task's default or ``tune.search_space``, validated, and Tune's domains for it; the jobs it
makes (a trial's, the refit's).

A domain is ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``, ``{choice: [..]}``, ``{grid: [..]}``,
``{randint: [lo, hi]}`` or a fixed value; every value a domain can take must give a valid job, and
that is checked (all problems at once) before Ray starts. Categorical values travel to searchers as
primitives (mappings as JSON text).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from ce_ray import storage
from ce_ray.config import ConfigError, JobConfig, apply_override, job_from_dict
from ce_ray.tasks import default_search_losses

__all__ = [
    "DOMAINS",
    "build_searcher",
    "default_search_space",
    "search_space",
    "startup_trials",
    "trial_job",
    "tune_domains",
    "values_in_space",
]

DOMAINS = ("loguniform", "uniform", "choice", "grid", "randint")


def default_search_space(job: JobConfig, has_scores: bool = False) -> dict[str, Any]:
    """The search space used when ``tune.search_space`` is not set (losses from the registry's ``default_search``)."""
    batches = [b for b in (16, 32, 64) if b % job.scaling.num_workers == 0] or [job.train.batch_size]
    return {
        # rerank: a fresh 1-output head on a small model takes larger steps than an NLI head
        "train.learning_rate": {"loguniform": [1e-6, 1e-4] if job.task == "nli" else [5e-6, 3e-4]},
        "train.batch_size": {"choice": batches},
        "train.loss": {"choice": default_search_losses(job.task, has_scores)},
    }


def encode(value: Any) -> Any:
    """Categorical values go to searchers as primitives: mappings become JSON text."""
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def decode(value: Any) -> Any:
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


def tune_domains(space: dict[str, Any], search: str) -> dict[str, Any]:
    from ray import tune

    param_space: dict[str, Any] = {}
    for key, spec in space.items():
        if not (isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in DOMAINS):
            param_space[key] = encode(spec)
            continue
        kind, arg = next(iter(spec.items()))
        if kind == "loguniform":
            param_space[key] = tune.loguniform(*arg)
        elif kind == "uniform":
            param_space[key] = tune.uniform(*arg)
        elif kind == "randint":
            param_space[key] = tune.randint(*arg)
        elif kind == "grid" or (kind == "choice" and search == "grid"):
            param_space[key] = tune.grid_search([encode(v) for v in arg])
        else:
            param_space[key] = tune.choice([encode(v) for v in arg])
    return param_space


def trial_job(base: dict[str, Any], params: dict[str, Any]) -> JobConfig:
    """The job of one trial: the base job with the sampled values applied."""
    raw = copy.deepcopy(base)
    for key, value in params.items():
        apply_override(raw, key, decode(value))
    return job_from_dict(raw)


def refit_job(job: JobConfig, trial: JobConfig) -> JobConfig:
    """The best trial's job with ``tune.refit_set`` applied, trained under ``<output_dir>/refit``, its data cached
    with the search's (so the eval and test rows are prepared once, and the refit reuses the trials' step-0 score)."""
    raw = trial.to_dict()
    for key, value in job.tune.refit_set.items():
        apply_override(raw, key, value)
    if raw["data"].get("cache_dir") is None:  # the search's cache root (data.prepare.cache_root's default)
        apply_override(raw, "data.cache_dir", storage.join(job.run.output_dir, "data"))
    apply_override(raw, "run.output_dir", storage.join(job.run.output_dir, "refit"))
    apply_override(raw, "run.name", f"{job.run.name}-refit")
    try:
        return job_from_dict(raw, "tune.refit_set")
    except ConfigError as exc:
        raise ConfigError([f"tune.refit_set: {e}" for e in exc.errors]) from None


def values_in_space(space: dict[str, Any], key: str, default: Any) -> list[Any]:
    """Every value a categorical key of the space can take (its fixed value, or the job's own when absent)."""
    spec = space.get(key)
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("choice", "grid"):
        return list(next(iter(spec.values())))
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) == "randint":
        return [spec["randint"][1] - 1]  # the largest
    return [spec] if spec is not None else [default]


def startup_trials(job: JobConfig) -> int:
    """Random trials before TPE starts modelling: ``tune.startup_trials``, else a third of the search (2..10).

    Optuna's default of 10 random trials would leave every search of up to 10 trials purely random.
    """
    if job.tune.startup_trials is not None:
        return job.tune.startup_trials
    return max(2, min(10, job.tune.num_samples // 3))


def build_searcher(job: JobConfig, metric: str, mode: str, max_concurrent: int):
    """Optuna TPE, or Tune's random/grid generator (which takes the concurrency cap itself)."""
    from ray.tune.search import BasicVariantGenerator

    points = [{k: encode(v) for k, v in p.items()} for p in job.tune.points_to_evaluate] or None
    if job.tune.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(n_startup_trials=startup_trials(job), seed=job.tune.seed)
        return OptunaSearch(metric=metric, mode=mode, sampler=sampler, points_to_evaluate=points)
    return BasicVariantGenerator(random_state=job.tune.seed, points_to_evaluate=points, max_concurrent=max_concurrent)
