"""From Ray Train checkpoints to a plain CrossEncoder directory: which one, staged, then published."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator

from ce_ray import storage
from ce_ray.config import JobConfig
from ce_ray.modeling import export_model
from ce_ray.tasks import TASKS, best_by

__all__ = ["CHECKPOINT_SUBDIR", "chosen_checkpoint", "export_checkpoint", "staged_model"]

# The folder inside a Ray checkpoint that holds the model: Ray's RayTrainReportCallback.CHECKPOINT_NAME, written
# here so the driver need not import transformers' Trainer to read it (tests/test_train.py checks they agree).
CHECKPOINT_SUBDIR = "checkpoint"


@contextlib.contextmanager
def staged_model(checkpoint) -> Iterator[str]:
    """The model inside a Ray checkpoint as a plain CrossEncoder directory in a local temp dir.

    Score it, add files to it, then :func:`ce_ray.storage.publish_dir` it; the temp dir goes away after.
    """
    with checkpoint.as_directory() as ckpt_dir, tempfile.TemporaryDirectory(prefix="ce_ray_export_") as tmp:
        model_dir = os.path.join(ckpt_dir, CHECKPOINT_SUBDIR)
        yield export_model(model_dir if os.path.isdir(model_dir) else ckpt_dir, os.path.join(tmp, "model"))


def export_checkpoint(checkpoint, dest_uri: str) -> str:
    """Publish the model inside a Ray checkpoint as a plain CrossEncoder directory at ``dest_uri``."""
    with staged_model(checkpoint) as model_dir:
        return storage.publish_dir(model_dir, dest_uri)


def best_checkpoint(job: JobConfig, result):
    """``(checkpoint, metrics)`` of the best checkpoint Ray kept, by the task's eval metric; or None."""
    task = TASKS[job.task]
    if not getattr(result, "best_checkpoints", None):
        return None
    return best_by(result.best_checkpoints, task.tune_metric, task.mode, key=lambda cm: cm[1])


def chosen_checkpoint(job: JobConfig, result):
    """The checkpoint that becomes ``final/``: the best by the eval metric (``run.final: best``) or the last."""
    best = best_checkpoint(job, result)
    if job.run.final == "best" and best is not None:
        return best[0]
    return result.checkpoint
