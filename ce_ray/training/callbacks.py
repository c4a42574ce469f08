"""Trainer callbacks that wire ``CrossEncoderTrainer`` to Ray Train: reporting and early stopping."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import ray.train
from ray.train.huggingface.transformers import RayTrainReportCallback
from transformers import TrainerCallback

__all__ = ["CHECKPOINT_SUBDIR", "EarlyStopping", "Reporter"]

CHECKPOINT_SUBDIR = RayTrainReportCallback.CHECKPOINT_NAME  # "checkpoint"


def _eval_entries(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in log_history if any(k.startswith("eval_") for k in entry)]


class Reporter(TrainerCallback):
    """Reports to Ray Train at every save: eval metrics (rank 0's) and rank 0's checkpoint.

    Does what :class:`RayTrainReportCallback` does at a save, with two changes: only rank 0 uploads
    (the others report ``None``), so workers sharing a node never copy a checkpoint another rank is
    still writing; and the metrics add ``baseline_*`` (the evaluation before training) and progress
    counters. The checkpoint sits under the same ``checkpoint/`` folder name as Ray's callback uses.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank = rank
        self.world_size = world_size

    def on_save(self, args, state, control, **kwargs):
        from transformers.trainer_utils import get_last_checkpoint

        metrics: dict[str, Any] = {}
        for entry in state.log_history:
            metrics.update(entry)
        evals = _eval_entries(state.log_history)
        if evals:
            metrics.update({f"baseline_{k[5:]}": v for k, v in evals[0].items() if k.startswith("eval_")})
        metrics.update(step=state.global_step, max_steps=state.max_steps, epoch=state.epoch, world_size=self.world_size)
        with tempfile.TemporaryDirectory(prefix="ce_ray_ckpt_") as tmp:
            checkpoint = None
            if self.rank == 0:
                source = get_last_checkpoint(args.output_dir)
                if source is not None:
                    shutil.copytree(source, os.path.join(tmp, CHECKPOINT_SUBDIR))
                    checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics=metrics, checkpoint=checkpoint)


class EarlyStopping(TrainerCallback):
    """Stop after ``patience`` evaluation rounds without a better eval metric (``train.early_stopping_patience``).

    The evaluator runs on rank 0, so rank 0 decides and broadcasts the decision: every rank stops at
    the same step (a rank that went on alone would wait forever in the next all-reduce).
    """

    def __init__(self, metric: str, mode: str, patience: int):
        self.metric, self.sign, self.patience = metric, 1 if mode == "max" else -1, patience
        self.best: float | None = None
        self.rounds_without_gain = 0
        self.stopped_at: int | None = None

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        import torch.distributed as dist

        value = (metrics or {}).get(self.metric)
        if value is not None:
            if self.best is None or self.sign * value > self.sign * self.best:
                self.best, self.rounds_without_gain = value, 0
            else:
                self.rounds_without_gain += 1
        decision = [self.rounds_without_gain >= self.patience]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        if decision[0]:
            control.should_training_stop = True
            self.stopped_at = state.global_step
