"""What a worker measures about its own training, for ``summary.json``, the tests and the benchmarks.

None of it changes training. :class:`WorkerStats` wraps a ready ``CrossEncoderTrainer``: it counts
the rows the data collator hands this rank (and fingerprints them with ``run.log_row_ids``, so tests
can prove the shards are disjoint), times the training steps alone, counts evaluator runs (and keeps the step-0 score for the next run
that starts from the same model and eval rows: :class:`CountingEvaluator`), and
writes ``<stats_dir>/rank<N>.json`` when training starts and when it ends (peak memory, a checksum
of the weights to show DDP ranks end identical, where it ran, its placement group).
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import time
from typing import Any

from sentence_transformers.base.evaluation import SequentialEvaluator
from transformers import TrainerCallback

from ce_ray import storage
from ce_ray.workarounds.ray_54305 import placement_group_id

__all__ = ["CountingEvaluator", "WorkerStats", "read_worker_stats", "start_score_key"]


class _RowCounter:
    """Wraps the data collator: counts the rows this worker trains on (and fingerprints them if asked)."""

    def __init__(self, collate, record_ids: bool):
        self.collate = collate
        self.record_ids = record_ids
        self.rows = 0
        self.ids: list[str] = []

    def __call__(self, features):
        self.rows += len(features)
        if self.record_ids:
            for row in features:
                text = "\x1f".join(str(v) for k, v in row.items() if k not in ("label", "labels", "score"))
                self.ids.append(hashlib.blake2b(text.encode(), digest_size=8).hexdigest())
        return self.collate(features)

    def __getattr__(self, name: str):  # valid_label_columns, tokenizer... of the wrapped collator
        return getattr(self.collate, name)


class _Timer(TrainerCallback):
    """Wall time of the training steps alone (evaluation and checkpointing excluded)."""

    def __init__(self):
        self.step_seconds = 0.0
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            self.step_seconds += time.perf_counter() - self._start
            self._start = None


class CountingEvaluator(SequentialEvaluator):
    """The task's evaluator, counting how often this rank ran it (sentence-transformers runs it on rank 0).

    ``start_uri``: where the evaluation at step 0 is kept. Every run and trial that starts from the same model
    and scores the same eval rows the same way gets the same step-0 score (:func:`start_score_key` says what
    "the same" covers), so the first one writes it there and the later ones read it instead of scoring again.
    """

    def __init__(self, evaluator, start_uri: str | None = None):
        super().__init__([evaluator])
        self.calls = 0
        self.start_reused = False
        self.start_uri = start_uri

    def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        self.calls += 1
        evaluator = self.evaluators[0]
        start = self.start_uri if steps == 0 else None
        if start and storage.exists(start):
            kept = storage.read_json(start)
            metrics = kept["metrics"]
            evaluator.primary_metric = self.primary_metric = kept["primary_metric"]  # as the evaluator's call sets it
            evaluator.store_metrics_in_model_card_data(model, metrics, epoch, steps)  # and the model card's metrics
            self.start_reused = True
            return metrics
        metrics = evaluator(model, output_path, epoch, steps)
        self.primary_metric = evaluator.primary_metric
        if start:
            plain = {k: float(v) if isinstance(v, (int, float)) else v for k, v in metrics.items()}
            storage.write_json(start, {"metrics": plain, "primary_metric": self.primary_metric})
        return metrics


def start_score_key(job, model, eval_rows: str, precision: str) -> dict[str, Any]:
    """What decides a run's score at step 0: the model as loaded (a checksum of its weights, new head included,
    and ``model.*``), the eval rows (``eval_rows``: their prepared copy's content key), and how they are scored
    (batch size, precision, threads, device, compilation, library versions). Not the optimiser, the loss, the batch
    size or the training rows: none of them has touched the model before its first evaluation."""
    import sentence_transformers
    import torch
    import transformers

    return {
        "weights": _param_checksum(model),
        "model": job.model.model_dump(mode="json"),
        "task": job.task,
        "eval": eval_rows,
        "eval_batch_size": job.train.eval_batch_size,
        "precision": precision,
        "compile": job.train.compile,
        "pad_to_multiple_of": job.train.pad_to_multiple_of,
        "device": torch.cuda.get_device_name() if job.scaling.use_gpu and torch.cuda.is_available() else "cpu",
        "threads": torch.get_num_threads(),
        "versions": [torch.__version__, transformers.__version__, sentence_transformers.__version__],
    }


def _peak_gpu_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _param_checksum(model) -> str:
    """SHA-256 over all parameters (to show DDP ranks end with identical weights)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class WorkerStats:
    """One worker's statistics file, ``<stats_dir>/rank<N>.json``: written at start and at the end."""

    def __init__(self, stats_dir: str, rank: int, world_size: int, record_ids: bool):
        import ray

        self.uri = storage.join(stats_dir, f"rank{rank}.json")
        self.record_ids = record_ids
        self.timer = _Timer()
        self.counter: _RowCounter | None = None
        self.evaluator: CountingEvaluator | None = None
        self.identity: dict[str, Any] = {
            "rank": rank,
            "world_size": world_size,
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            # read by the tuner to release the group when Tune stops the trial (ce_ray.workarounds.ray_54305)
            "placement_group_id": placement_group_id(),
        }
        self.started = 0.0

    def wrap_evaluator(self, evaluator, start_uri: str | None = None) -> CountingEvaluator:
        self.evaluator = CountingEvaluator(evaluator, start_uri)
        return self.evaluator

    def attach(self, trainer) -> None:
        """Count the rows of ``trainer``'s batches and time its steps; mark this worker as running."""
        self.counter = _RowCounter(trainer.data_collator, self.record_ids)
        trainer.data_collator = self.counter
        trainer.add_callback(self.timer)
        self.started = time.time()
        storage.write_json(self.uri, {"status": "running", **self.identity})

    def finish(self, trainer, output, *, resumed: bool, early_stopped_at: int | None) -> None:
        """Write the final statistics of this worker's run."""
        args, rows = trainer.args, self.counter.rows if self.counter else 0
        stats = {
            "status": "done",
            **self.identity,
            "global_step": trainer.state.global_step,
            "steps_this_attempt": trainer.state.global_step - getattr(trainer, "_initial_global_step", 0),
            "resumed": resumed,
            "per_device_batch_size": args.per_device_train_batch_size,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "early_stopped_at_step": early_stopped_at,
            "rows_seen": rows,
            "train_runtime_s": output.metrics.get("train_runtime"),
            "step_seconds": self.timer.step_seconds,
            "samples_per_second": rows / self.timer.step_seconds if self.timer.step_seconds else None,
            "evaluations_run": self.evaluator.calls if self.evaluator else None,
            "start_score_reused": self.evaluator.start_reused if self.evaluator else None,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mem_gib": _peak_gpu_gib(),
            "param_checksum": _param_checksum(trainer.model),
            "wall_s": time.time() - self.started,
        }
        if self.record_ids and self.counter:
            stats["row_ids"] = self.counter.ids
        storage.write_json(self.uri, stats)


def read_worker_stats(stats_dir: str, world_size: int) -> list[dict[str, Any]]:
    """The ``rank<N>.json`` files the workers wrote (those that exist)."""
    stats = []
    for rank in range(world_size):
        uri = storage.join(stats_dir, f"rank{rank}.json")
        if storage.exists(uri):
            stats.append(storage.read_json(uri))
    return stats
