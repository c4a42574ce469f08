"""Distributed CrossEncoder training: one ``CrossEncoderTrainer`` per Ray Train worker, real DDP.

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
- Outputs: ``<output_dir>/final/`` (a plain CrossEncoder directory), ``<output_dir>/summary.json``
  and per-worker statistics in ``<output_dir>/workers/``.

Two traps this module handles: ``CrossEncoderTrainingArguments`` on CPU stays NOT_PARALLEL unless
``use_cpu=True`` (each worker would silently train on everything), and HF's default
``ddp_find_unused_parameters=True`` breaks DDP for CrossEncoders (it cannot see the tensors in
the model's output and marks every parameter unused, then "ready twice").
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import resource
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from sentence_transformers.base.evaluation import SequentialEvaluator
from transformers import TrainerCallback

from ce_ray import storage
from ce_ray.config import JobConfig, job_from_dict
from ce_ray.modeling import check_model, export_model, load_cross_encoder, load_for_inference, set_pad_multiple
from ce_ray.prepare import PreparedData, PreparedSplit, load_prepared, prepare_data, prepare_split
from ce_ray.runtime import ensure_ray
from ce_ray.tasks import TASKS

__all__ = ["TrainOutcome", "make_trainer", "run_training", "train_loop_per_worker", "training_arguments"]

logger = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = RayTrainReportCallback.CHECKPOINT_NAME  # "checkpoint"


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------
def training_arguments(job: JobConfig, world_size: int, output_dir: str, resuming: bool):
    """``CrossEncoderTrainingArguments`` for one worker of a ``world_size``-worker run."""
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments

    from ce_ray.batching import LengthGroupedBatchSampler
    from ce_ray.losses import LOSSES

    t, run = job.train, job.run
    precision = resolve_precision(t.precision, job.scaling.use_gpu)
    in_batch = LOSSES[job.loss.name].shape == "n-tuple"  # (Cached)MultipleNegativesRankingLoss
    if in_batch:  # in-batch negatives must not be duplicates of the positive
        sampler = BatchSamplers.NO_DUPLICATES
    else:
        sampler = LengthGroupedBatchSampler if t.group_by_length else BatchSamplers.BATCH_SAMPLER
    return CrossEncoderTrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=t.batch_size // world_size,
        per_device_eval_batch_size=t.eval_batch_size,
        learning_rate=t.learning_rate,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        seed=t.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        tf32=True if job.scaling.use_gpu and _supports_tf32() else None,
        # Without use_cpu the args stay NOT_PARALLEL on CPU and every worker trains on all rows.
        use_cpu=not job.scaling.use_gpu,
        ddp_find_unused_parameters=False,
        dataloader_drop_last=world_size > 1,
        dataloader_num_workers=0 if run.log_row_ids else t.dataloader_workers,
        dataloader_pin_memory=job.scaling.use_gpu,
        eval_strategy="steps",
        eval_steps=run.checkpoint_every,
        eval_on_start=not resuming,
        save_strategy="steps",
        save_steps=run.checkpoint_every,
        save_total_limit=1,  # local copies only; Ray keeps the uploaded ones
        logging_steps=max(1, min(run.checkpoint_every, 50)),
        report_to="none",
        disable_tqdm=True,
        batch_sampler=sampler,
        torch_compile=t.compile,
        optim=t.optimizer,
    )


def native_bf16(use_gpu: bool) -> bool:
    """Whether this machine computes bf16 natively: a GPU with bf16, or a CPU with avx512_bf16/amx_bf16 (or Arm bf16)."""
    import platform

    import torch

    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:  # not Linux: no cheap way to tell, stay with fp32
        return False
    if {"avx512_bf16", "amx_bf16"} & flags:
        return True
    return platform.machine() in ("aarch64", "arm64") and "bf16" in flags


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """``train.precision`` on this worker: ``auto`` = bf16 where it is native (:func:`native_bf16`), else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(use_gpu) else "fp32"


def pad_multiple(job: JobConfig) -> int | None:
    """``train.pad_to_multiple_of``, or its default: 8 on GPU (tensor-core friendly shapes), none on CPU."""
    if job.train.pad_to_multiple_of is not None:
        return job.train.pad_to_multiple_of
    return 8 if job.scaling.use_gpu else None


def _supports_tf32() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def _eval_entries(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in log_history if any(k.startswith("eval_") for k in entry)]


class _Reporter(RayTrainReportCallback):
    """Reports to Ray Train at every save: eval metrics (rank 0's) and rank 0's checkpoint.

    Like :class:`RayTrainReportCallback`, but only rank 0 uploads (the others report ``None``), so
    workers sharing a node never copy a checkpoint another rank is still writing, and the metrics
    add ``baseline_*`` (the evaluation before training) and progress counters.
    """

    def __init__(self, rank: int, world_size: int):
        super().__init__()
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


class _EarlyStopping(TrainerCallback):
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


class _CountingEvaluator(SequentialEvaluator):
    """The task's evaluator, counting how often this rank ran it (sentence-transformers runs it on rank 0)."""

    def __init__(self, evaluator):
        super().__init__([evaluator])
        self.calls = 0

    def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        self.calls += 1
        evaluator = self.evaluators[0]
        metrics = evaluator(model, output_path, epoch, steps)
        self.primary_metric = evaluator.primary_metric
        return metrics


def _placement_group_id() -> str | None:
    pg = ray.util.get_current_placement_group()
    return pg.id.hex() if pg is not None else None


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


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs. ``config``: ``job`` (dict), ``data`` (PreparedData dict), ``stats_dir``."""
    from sentence_transformers.cross_encoder import CrossEncoderTrainer

    from ce_ray.losses import build_loss

    # [1] Rebuild the job and find this worker's place in the group.
    job = job_from_dict(config["job"])
    prepared = PreparedData.from_dict(config["data"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    task = TASKS[job.task]

    # [2] Model: loaded on CPU; the trainer moves it to this worker's device. Seeded first, so a new
    #     head starts the same on every rank and in every run. On CPU, use the cores this worker
    #     reserved (Ray would otherwise leave torch with one thread).
    from transformers import set_seed

    set_seed(job.train.seed)
    if not job.scaling.use_gpu:
        import torch

        torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    model = load_cross_encoder(job.model, job.task, device="cpu")
    set_pad_multiple(model, pad_multiple(job))

    # [3] Data: memory-mapped Arrow files; HF's distributed sampler hands this rank its shard.
    train_dataset = load_prepared(prepared.train.uri)
    eval_rows = load_prepared(prepared.eval.uri).data.table

    # [4] Loss (shaped for the rows) and evaluator (run by rank 0, others lend forward passes).
    loss = build_loss(job, model, train_dataset.data.table)
    evaluator = _CountingEvaluator(task.evaluator(eval_rows, job.train.eval_batch_size))

    # [5] Arguments: per-worker batch = global batch / world size; resume from Ray's latest checkpoint.
    checkpoint = ray.train.get_checkpoint()
    local_dir = tempfile.mkdtemp(prefix=f"ce_ray_rank{rank}_")  # per rank: no two ranks share a dir
    args = training_arguments(job, world_size, local_dir, resuming=checkpoint is not None)

    # [6] Trainer, wired to Ray Train.
    timer = _Timer()
    callbacks: list[TrainerCallback] = [_Reporter(rank, world_size), timer]
    stopper = None
    if job.train.early_stopping_patience:
        stopper = _EarlyStopping(task.tune_metric, task.mode, job.train.early_stopping_patience)
        callbacks.append(stopper)
    trainer = CrossEncoderTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        loss=loss,
        evaluator=evaluator,
        callbacks=callbacks,
    )
    trainer = prepare_trainer(trainer)
    counter = _RowCounter(trainer.data_collator, job.run.log_row_ids)
    trainer.data_collator = counter

    # [7] Train (the evaluation at step 0 is the baseline; a resumed run already has it).
    started = time.time()
    identity = {
        "rank": rank,
        "world_size": world_size,
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        # read by the tuner to release the group's resources when Tune stops the trial (see ce_ray.tune)
        "placement_group_id": _placement_group_id(),
    }
    stats_uri = storage.join(config["stats_dir"], f"rank{rank}.json")
    storage.write_json(stats_uri, {"status": "running", **identity})
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            output = trainer.train(resume_from_checkpoint=os.path.join(ckpt_dir, CHECKPOINT_SUBDIR))
    else:
        output = trainer.train()

    # [8] Per-worker statistics, read by the driver for summary.json.
    steps_this_attempt = trainer.state.global_step - getattr(trainer, "_initial_global_step", 0)
    stats = {
        "status": "done",
        **identity,
        "global_step": trainer.state.global_step,
        "steps_this_attempt": steps_this_attempt,
        "resumed": checkpoint is not None,
        "per_device_batch_size": args.per_device_train_batch_size,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "early_stopped_at_step": stopper.stopped_at if stopper else None,
        "rows_seen": counter.rows,
        "train_runtime_s": output.metrics.get("train_runtime"),
        "step_seconds": timer.step_seconds,
        "samples_per_second": counter.rows / timer.step_seconds if timer.step_seconds else None,
        "evaluations_run": evaluator.calls,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mem_gib": _peak_gpu_gib(),
        "param_checksum": _param_checksum(trainer.model),
        "wall_s": time.time() - started,
    }
    if job.run.log_row_ids:
        stats["row_ids"] = counter.ids
    storage.write_json(stats_uri, stats)
    shutil.rmtree(local_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# driver side
# --------------------------------------------------------------------------------------------
def make_trainer(
    job: JobConfig,
    prepared: PreparedData,
    *,
    name: str,
    storage_path: str,
    stats_dir: str,
    callbacks: list | None = None,
):
    """The ``TorchTrainer`` for one run (used by :func:`run_training` and by each tune trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    s = job.scaling
    resources = {"CPU": s.cpus_per_worker}
    if s.use_gpu:
        resources["GPU"] = s.gpus_per_worker
    task = TASKS[job.task]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job.to_dict(), "data": prepared.to_dict(), "stats_dir": stats_dir},
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


def best_by(items: list, metric: str, mode: str, key=lambda item: item):
    """The item whose ``key(item)[metric]`` is best under ``mode`` (max/min); items without it lose."""
    sign = 1 if mode == "max" else -1

    def score(item) -> float:
        value = key(item).get(metric)
        return -math.inf if value is None else sign * value

    return max(items, key=score)


def chosen_checkpoint(job: JobConfig, result):
    """The checkpoint that becomes ``final/``: the best by the eval metric (``run.final: best``) or the last."""
    task = TASKS[job.task]
    if job.run.final == "best" and getattr(result, "best_checkpoints", None):
        checkpoint, _ = best_by(result.best_checkpoints, task.tune_metric, task.mode, key=lambda cm: cm[1])
        return checkpoint
    return result.checkpoint


def score_baseline(job: JobConfig, eval_split: PreparedSplit, test_split: PreparedSplit | None) -> None:
    """Score the retriever baseline before training (cached; a bad eval.baseline fails before Ray starts)."""
    from ce_ray.baseline import baseline_metrics

    if job.baseline_model is None:
        return
    metric = TASKS[job.task].primary_metric
    for split_name, split in (("eval", eval_split), ("test", test_split)):
        metrics = baseline_metrics(job, split)
        if metrics is not None:
            print(f"retriever baseline ({job.baseline_model}, zero-shot cosine) on {split_name}: {metric} {metrics[metric]:.4f}", flush=True)


def model_quality(job: JobConfig, model_dir: str, eval_metrics: dict[str, float], test_split: PreparedSplit | None) -> dict[str, Any]:
    """Score a staged model on the test rows and set it beside the retriever baseline (written into the model dir).

    Returns ``{task, metric, model: {eval, test}, baseline: {model, eval, test}, verdict}``.
    """
    from ce_ray.baseline import baseline_metrics, verdict, write_model_quality

    task = TASKS[job.task]
    test = None
    if test_split is not None:  # held-out rows, scored once with the exported model
        test_rows = load_prepared(test_split.uri).data.table
        test = task.evaluate(load_for_inference(model_dir), test_rows, job.train.eval_batch_size)
    prepared_eval = prepare_split(job, "eval")  # cached
    baseline = {
        "model": job.baseline_model,
        "eval": baseline_metrics(job, prepared_eval),
        "test": baseline_metrics(job, test_split),
    }
    model = {"eval": eval_metrics, "test": test}
    quality = {
        "task": job.task,
        "metric": task.primary_metric,
        "model": model,
        "baseline": baseline if job.baseline_model else None,
        "verdict": verdict(task.primary_metric, model, baseline, job.baseline_model) if job.baseline_model else None,
    }
    write_model_quality(model_dir, quality)
    return quality


def read_worker_stats(stats_dir: str, world_size: int) -> list[dict[str, Any]]:
    """The ``rank<N>.json`` files the workers wrote (those that exist)."""
    stats = []
    for rank in range(world_size):
        uri = storage.join(stats_dir, f"rank{rank}.json")
        if storage.exists(uri):
            stats.append(storage.read_json(uri))
    return stats


_TIMING_KEYS = ("runtime", "samples_per_second", "steps_per_second")


def _metrics_with_prefix(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """Evaluator metrics under ``prefix`` (``eval_``/``baseline_``), prefix removed, timings left out."""
    return {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix) and k[len(prefix) :] not in _TIMING_KEYS}


def summarize(job: JobConfig, result, prepared: PreparedData, workers: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """The ``summary.json`` of a run: task, loss, hyperparameters, metrics before/after, throughput."""
    metrics = dict(result.metrics or {})
    task = TASKS[job.task]
    before = _metrics_with_prefix(metrics, "baseline_")
    after = _metrics_with_prefix(metrics, "eval_")
    step_seconds = max((w.get("step_seconds") or 0.0) for w in workers) if workers else None
    rows = sum(w.get("rows_seen", 0) for w in workers)
    best = None
    if getattr(result, "best_checkpoints", None):
        ckpt, best_metrics = best_by(result.best_checkpoints, task.tune_metric, task.mode, key=lambda cm: cm[1])
        best = {
            "path": ckpt.path,
            "step": best_metrics.get("step"),
            task.tune_metric: best_metrics.get(task.tune_metric),
            "metrics": _metrics_with_prefix(best_metrics, "eval_"),
        }
    return {
        "task": job.task,
        "model": job.model.name,
        "loss": job.loss.label(),
        "hyperparameters": {
            "learning_rate": job.train.learning_rate,
            "batch_size": job.train.batch_size,
            "per_worker_batch_size": job.train.batch_size // job.scaling.num_workers,
            "epochs": job.train.epochs,
            "max_steps": job.train.max_steps,
            "warmup_ratio": job.train.warmup_ratio,
            "weight_decay": job.train.weight_decay,
            "precision": workers[0].get("precision", job.train.precision) if workers else job.train.precision,
            "seed": job.train.seed,
        },
        "primary_metric": task.primary_metric,
        "metrics_before": before,
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


def run_training(job: JobConfig) -> TrainOutcome:
    """Train one job end to end: prepare data, fit on Ray, publish ``final/`` and ``summary.json``.

    Raises:
        ConfigError / DataError: before Ray starts, for a bad config or bad rows.
        ray.train.TrainingFailedError: when training fails beyond ``run.max_failures`` restarts.
    """
    started = time.time()
    job.require_data("train", "eval")
    out = storage.resolve_uri(job.run.output_dir)
    job = job.model_copy(deep=True)
    job.run.output_dir = out

    # [1] Model config and data: checked, shaped and saved before any cluster work.
    check_model(job.model)
    prepared = prepare_data(job)
    test_split = prepare_split(job, "test") if job.data.test is not None else None
    score_baseline(job, prepared.eval, test_split)

    # [2] Fit on Ray.
    ensure_ray()
    stats_dir = storage.join(out, "workers")
    trainer = make_trainer(job, prepared, name=job.run.name, storage_path=out, stats_dir=stats_dir)
    result = trainer.fit()

    # [3] Publish the final model (best or last checkpoint, with its test score and the retriever
    #     baseline inside) and the summary, both atomically.
    workers = read_worker_stats(stats_dir, job.scaling.num_workers)
    summary = summarize(job, result, prepared, workers, time.time() - started)
    checkpoint = chosen_checkpoint(job, result)
    final_metrics = (
        summary["best_checkpoint"]["metrics"] if job.run.final == "best" and summary["best_checkpoint"] else summary["metrics_after"]
    )
    with staged_model(checkpoint) as model_dir:
        quality = model_quality(job, model_dir, final_metrics, test_split)
        final_dir = storage.publish_dir(model_dir, storage.join(out, "final"))
    summary["final_model"] = final_dir
    summary["final_checkpoint"] = job.run.final
    summary["metrics_final"] = final_metrics
    if quality["model"]["test"] is not None:
        summary["metrics_test"] = quality["model"]["test"]
        summary["test_rows"] = test_split.rows
    summary["baseline"] = quality["baseline"]
    summary["verdict"] = quality["verdict"]
    summary["wall_time_s"] = time.time() - started
    summary_path = storage.join(out, "summary.json")
    storage.write_json(summary_path, summary)
    return TrainOutcome(summary=summary, final_dir=final_dir, summary_path=summary_path, result=result)
