"""Trainer callbacks that wire ``CrossEncoderTrainer`` to Ray Train: reporting, early stopping, progress for the console."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

import ray.train
from transformers import TrainerCallback

from ce_ray.training.checkpoint import CHECKPOINT_SUBDIR

logger = logging.getLogger(__name__)

__all__ = ["EarlyStopping", "Progress", "Reporter"]


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


class Progress(TrainerCallback):
    """Rank 0's progress for the driver's console: events on a ``ray.util.queue.Queue`` (see
    :class:`ce_ray.console.TrainProgress` for their fields; in a search, a :class:`ce_ray.console.TrialEvents`
    that tags them with the trial id).

    Sent at the start and end of training, at every logging step (loss, learning rate), every
    evaluation (the metrics) and otherwise at most every ``every_s`` seconds, so a long step costs
    one small actor call at most. ``samples`` and ``train_s`` count this attempt's rows and the
    seconds spent in training steps alone (evaluation and checkpoints excluded).
    """

    def __init__(self, queue, world_size: int, every_s: float = 1.0):
        self.queue, self.world_size, self.every_s = queue, world_size, every_s
        self._first_step = 0
        self._train_s = 0.0
        self._step_started: float | None = None
        self._sent = float("-inf")

    def _send(self, kind: str, args, state, **fields) -> None:
        if self.queue is None:
            return
        samples = (state.global_step - self._first_step) * args.per_device_train_batch_size * self.world_size
        now = time.time()
        self._sent = now
        try:
            self.queue.put_nowait(
                {"kind": kind, "step": state.global_step, "max_steps": state.max_steps, "t": now,
                 "samples": samples, "train_s": self._train_s, **fields}
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001 - the console's queue is gone: training goes on without it
            logger.warning("progress queue unavailable (%s: %s); no more live progress from this worker", type(e).__name__, e)
            self.queue = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._first_step = state.global_step
        self._send("start", args, state)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._step_started is not None:
            self._train_s += time.perf_counter() - self._step_started
            self._step_started = None
        if time.time() - self._sent >= self.every_s:
            self._send("step", args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            lr = logs.get("learning_rate")
            self._send("log", args, state, loss=float(logs["loss"]), learning_rate=float(lr) if lr is not None else None)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self._send("eval", args, state, metrics={k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float))})

    def on_train_end(self, args, state, control, **kwargs):
        self._send("end", args, state)


class Throughput(TrainerCallback):
    """Adds ``samples_per_second`` (global, over the training steps since the previous log) to every training log.

    Put first in the trainer's callbacks (:func:`add_throughput`), so the ``report_to`` integrations that run
    after it (TensorBoard, MLflow, W&B) log it with the loss and learning rate.
    """

    def __init__(self, world_size: int):
        self.world_size = world_size
        self._seconds, self._steps = 0.0, 0
        self._started: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._started is not None:
            self._seconds += time.perf_counter() - self._started
            self._steps += 1
            self._started = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs and self._seconds > 0:
            samples = self._steps * args.per_device_train_batch_size * self.world_size
            logs["samples_per_second"] = round(samples / self._seconds, 2)
            self._seconds, self._steps = 0.0, 0


def add_throughput(trainer, world_size: int) -> None:
    """Put a :class:`Throughput` first among ``trainer``'s callbacks (before the logging integrations)."""
    trainer.callback_handler.callbacks.insert(0, Throughput(world_size))
