"""What a ``run.name`` was started with, so that re-running it resumes only the same run.

``ce-ray train`` and ``ce-ray tune`` resume a run whose name already has checkpoints (or a Tune
experiment) in ``run.output_dir``. Resuming with another model, data, loss or search space would mix
two runs silently, so the first start records the settings that define the run in
``<output_dir>/<run.name>.run.json``; a later start with different ones fails before any work with
one line naming the changed keys, unless ``run.restart`` (``--restart``) is set, which removes the
old run's checkpoints and starts over.

Part of the identity: ``task``, ``model``, the data sources (with each local file's size and sha256, a
remote file's size and mtime),
``data.negatives``/``drop_invalid``, the loss and optimisation settings of ``train`` and, for tune, the
search (space, searcher, scheduler, metric, refit; of ``tune.refit_set``, all but its ``scaling.*`` and ``run.*``
keys). Not part of it (they may change on resume): the
budget (``train.epochs``/``max_steps``/``early_stopping_patience``: a longer budget continues the run),
the machinery (precision, batching, dataloaders), ``scaling``, ``run``, ``serve``, ``eval``,
``tune.num_samples``/``max_concurrent_trials``/``max_failures``/``mlflow_uri``, ``data.cache_dir``.
"""

from __future__ import annotations

import logging
from typing import Any

from ce_ray import storage
from ce_ray.config import ConfigError, JobConfig

__all__ = ["check_run_identity", "run_identity", "same_run"]

logger = logging.getLogger(__name__)

# What defines the model being trained; the budget (epochs, max_steps, early stopping) and the machinery
# (precision, batching, dataloaders) may change on resume: a longer budget continues the same run.
_TRAIN_KEYS = ("loss", "learning_rate", "batch_size", "warmup_ratio", "weight_decay", "lr_scheduler", "seed", "optimizer")
_MACHINERY = ("scaling.", "run.")  # keys of tune.refit_set that may change on resume, as scaling and run do
_TUNE_KEYS = ("search_space", "search", "scheduler", "grace_period", "reduction_factor", "metric", "mode", "seed",
              "points_to_evaluate", "refit", "refit_set", "startup_trials")


def _flat(raw: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(raw, dict):
        out: dict[str, Any] = {}
        for key, value in raw.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out or {prefix: {}}
    return {prefix: raw}


def run_identity(job: JobConfig, kind: str) -> dict[str, Any]:
    """The settings that define a run (dotted key -> value), with each data file's fingerprint (storage.stat_fingerprint)."""
    from ce_ray.data.read import source_fingerprint

    raw = job.to_dict()
    train = {k: raw["train"][k] for k in _TRAIN_KEYS}
    identity: dict[str, Any] = {"kind": kind, "task": raw["task"], "model": raw["model"], "train": train}
    identity["data"] = {k: v for k, v in raw["data"].items() if k not in ("cache_dir", "train", "eval", "test")}
    for split in ("train", "eval", "test"):
        source = getattr(job.data, split)
        if isinstance(source, list):  # data.train as several sources: each one's fingerprint, by index
            identity["data"][split] = {str(i): source_fingerprint(src) for i, src in enumerate(source)}
        else:
            identity["data"][split] = source_fingerprint(source) if source is not None else None
    if kind == "tune":
        identity["tune"] = {k: raw["tune"][k] for k in _TUNE_KEYS}
        refit_set = raw["tune"]["refit_set"] or {}  # where and how the refit runs is machinery, as for the run itself
        identity["tune"]["refit_set"] = {k: v for k, v in refit_set.items() if not k.startswith(_MACHINERY)}
    return _flat(identity)


def _record_uri(job: JobConfig) -> str:
    return storage.join(job.run.output_dir, f"{job.run.name}.run.json")


def check_run_identity(job: JobConfig, kind: str, started: bool) -> None:
    """Record (first start) or compare (``started``: checkpoints exist) the identity of ``job``'s run.

    Raises:
        ConfigError: the run exists with other settings and ``run.restart`` is false.
    """
    uri = _record_uri(job)
    identity = run_identity(job, kind)
    recorded = storage.read_json(uri) if storage.exists(uri) else None
    if started and recorded is not None and recorded != identity:
        changed = sorted(k for k in recorded.keys() | identity.keys() if recorded.get(k) != identity.get(k))
        raise ConfigError(
            f"run.name: {job.run.name!r} in {job.run.output_dir} was started with other settings (changed: "
            f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}); resuming would mix two runs. Use "
            "--restart (run.restart: true) to start it over, or another run.name"
        )
    storage.write_json(uri, identity)


def same_run(job: JobConfig, kind: str) -> bool:
    """Whether ``job``'s ``run.name`` was started before with the settings it has now (its ``.run.json``)."""
    uri = _record_uri(job)
    return storage.exists(uri) and storage.read_json(uri) == run_identity(job, kind)
