"""ce-ray: fine-tune, tune and serve sentence-transformers CrossEncoders on Ray, from one job format.

The Python API is what the ``ce-ray`` CLI runs::

    import ce_ray

    job = ce_ray.load_job("jobs/rerank_train.yaml", ["train.epochs=2"])   # validated; errors name the key
    outcome = ce_ray.train(job)                  # Ray Train, DDP; outcome.final_dir, outcome.summary
    best = ce_ray.tune("jobs/rerank_tune.yaml")  # Ray Tune; best.best_dir, best.best, best.report_dir
    ce_ray.evaluate(job, outcome.final_dir)      # {"rows": ..., "ndcg@10": ..., ...} on data.test
    url = ce_ray.serve(best.best_dir)            # Ray Serve, returns the base URL (non-blocking)
    ce_ray.update_serving("runs/next/best")      # roll a new model out in place; rollback=True goes back
    ce_ray.stop_serving()

Each function takes a :class:`JobConfig`, a job file path or a plain dict (``overrides`` are
``--set``-style ``"key=value"`` strings). ``data={"train": ..., "eval": ...}`` replaces data sources
with in-memory rows (a ``datasets.Dataset``, a ``pyarrow.Table`` or a ``pandas.DataFrame``), saved as
Parquet under ``<run.output_dir>/data/inputs`` so Ray workers and caches see a file.

Bad config or data raises :class:`ConfigError` (or its subclass ``DataError``) before any cluster work.
Importing ``ce_ray`` is cheap: Ray, torch and sentence-transformers load on first use.

Packages: :mod:`ce_ray.data` (read, check, group, mine, shape, prepare), :mod:`ce_ray.training`,
:mod:`ce_ray.tuning`, :mod:`ce_ray.serving`, :mod:`ce_ray.demo`; modules: :mod:`ce_ray.config` (the
job schema), :mod:`ce_ray.tasks` (the registry of tasks and losses), :mod:`ce_ray.quality` (test
scores, the retriever baseline), :mod:`ce_ray.fusion` (the reranker fused with its retriever: the rule, the
weight fitted on eval rows), :mod:`ce_ray.modeling`, :mod:`ce_ray.storage`, :mod:`ce_ray.ray_jobs`
(Ray Jobs), :mod:`ce_ray.workarounds` (library bugs, one module each).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ce_ray.config import ConfigError, JobConfig, job_from_dict, load_job

if TYPE_CHECKING:
    from ce_ray.data.prepare import PreparedData
    from ce_ray.training import TrainOutcome
    from ce_ray.tuning import TuneOutcome

__all__ = [
    "ConfigError",
    "JobConfig",
    "evaluate",
    "load_job",
    "prepare",
    "serve",
    "stop_serving",
    "update_serving",
    "train",
    "tune",
]

JobLike = JobConfig | str | Path | dict


def _job(job: JobLike, overrides: list[str] | None, data: dict[str, Any] | None) -> JobConfig:
    """A validated job from a JobConfig, a YAML path or a dict, with overrides and in-memory data applied."""
    if isinstance(job, JobConfig):
        if overrides:
            from ce_ray.config import apply_override, parse_overrides

            raw = job.to_dict(secrets=True)
            for key, value in parse_overrides(overrides):
                apply_override(raw, key, value)
            job = job_from_dict(raw, "overrides")
    elif isinstance(job, dict):
        job = load_job(None, overrides, base=job)
    else:
        job = load_job(job, overrides)
    if data:
        from ce_ray.data.read import save_in_memory

        raw = job.to_dict(secrets=True)
        for split, rows in data.items():
            if split not in ("train", "eval", "test"):
                raise ConfigError(f"data: unknown split {split!r}; use train, eval or test")
            raw["data"][split] = save_in_memory(rows, job, split)
        job = job_from_dict(raw, "data")
    return job


def prepare(job: JobLike, overrides: list[str] | None = None, *, data: dict[str, Any] | None = None) -> PreparedData:
    """Check, shape (and for rerank, mine) ``data.train`` and ``data.eval`` and cache them; no Ray needed."""
    from ce_ray.data import prepare_data

    return prepare_data(_job(job, overrides, data))


def train(job: JobLike, overrides: list[str] | None = None, *, data: dict[str, Any] | None = None) -> TrainOutcome:
    """``ce-ray train``: fit the job on Ray Train and publish ``final/`` and ``summary.json`` (see :func:`ce_ray.training.run_training`)."""
    from ce_ray.training import run_training

    return run_training(_job(job, overrides, data))


def tune(job: JobLike, overrides: list[str] | None = None, *, data: dict[str, Any] | None = None) -> TuneOutcome:
    """``ce-ray tune``: search with Ray Tune and publish ``best/``, ``best.json`` and a report (see :func:`ce_ray.tuning.run_tuning`)."""
    from ce_ray.tuning import run_tuning

    return run_tuning(_job(job, overrides, data))


def evaluate(
    job: JobLike, model: str, overrides: list[str] | None = None, *, split: str = "test", data: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Score ``model`` (a directory, a train/tune output_dir, or a hub id) on ``data.<split>`` of the job.

    Returns the task's metrics (``accuracy``... or ``ndcg@10``...) plus ``rows`` and ``dropped``.
    """
    from ce_ray.quality import evaluate as _evaluate

    return _evaluate(_job(job, overrides, data), model, split)


def serve(model: str | None = None, job: JobLike | None = None, overrides: list[str] | None = None, **fields: Any) -> str:
    """``ce-ray serve`` without blocking: deploy ``model`` on Ray Serve and return the base URL.

    ``fields`` are ``serve.*`` settings (``port=8001, api_key=..., num_replicas=2``); ``job`` gives the rest.
    Stop with :func:`stop_serving`.
    """
    from ce_ray.serving import start_server

    cfg = _job(job or {"task": "rerank"}, overrides, None).serve
    updates = {**fields, **({"model": model} if model is not None else {})}
    if updates:
        from ce_ray.config import ServeConfig

        cfg = ServeConfig.model_validate({**cfg.model_dump(), **updates})
    return start_server(cfg)


def update_serving(models: dict[str, str] | str | None = None, *, rollback: bool = False, name: str | None = None) -> Any:
    """Swap the model(s) of a running server in place, or roll back to what it served before its latest update.

    ``models``: a dir (a one-model server) or ``{served name: dir}``. Serve starts replicas of the new version, and
    stops the old ones once they have finished their requests; none fails. Returns the settings now served
    (a :class:`~ce_ray.config.ServeConfig`). ``ce-ray serve --model NAME=DIR --update`` / ``--rollback``.
    """
    from ce_ray.serving import APP_NAME, update_server

    if isinstance(models, str):
        models = {"": models}
    return update_server(models, name=name or APP_NAME, rollback=rollback)


def stop_serving() -> None:
    """Stop what :func:`serve` started (and Ray Serve with it)."""
    from ce_ray.serving import stop_server

    stop_server()
