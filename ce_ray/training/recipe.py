"""The recipe every Ray Train worker runs: one ``CrossEncoderTrainer`` per worker, real DDP.

:func:`train_loop_per_worker` is the notebook's recipe (model, data, loss, evaluator, arguments,
trainer, train) with three changes for Ray: each worker trains on its shard of the prepared rows,
reports to Ray Train at every save, and resumes from Ray's latest checkpoint. What it measures
about itself lives in :mod:`ce_ray.training.instrument`.

Two traps handled here: ``CrossEncoderTrainingArguments`` on CPU stays NOT_PARALLEL unless
``use_cpu=True`` (each worker would silently train on everything), and HF's default
``ddp_find_unused_parameters=True`` breaks DDP for CrossEncoders (it cannot see the tensors in
the model's output and marks every parameter unused, then "ready twice").
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

import ray.train

from ce_ray import storage
from ce_ray.config import JobConfig, job_from_dict
from ce_ray.data.prepare import PreparedData, fingerprint, load_prepared
from ce_ray.modeling import load_cross_encoder, set_pad_multiple
from ce_ray.runtime import resolve_precision
from ce_ray.tasks import LOSSES, TASKS, build_loss
from ce_ray.training.card import card_data
from ce_ray.training.checkpoint import CHECKPOINT_SUBDIR

__all__ = ["pad_multiple", "train_loop_per_worker", "training_arguments"]


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs. ``config``: ``job`` (dict), ``data`` (PreparedData dict), ``stats_dir``,
    ``log_dir`` (where rank 0 publishes its TensorBoard events, or None), ``progress`` (a ``ray.util.queue.Queue``
    rank 0 sends its progress to for the driver's console, or None)."""
    # Here, not at the top: the processes that only hand this function to Ray Train (the driver, a Tune trial's
    # driver) then skip ~3 s of imports (transformers' Trainer, sentence-transformers, scikit-learn).
    from ray.train.huggingface.transformers import prepare_trainer
    from sentence_transformers.cross_encoder import CrossEncoderTrainer
    from transformers import set_seed

    from ce_ray.training.callbacks import EarlyStopping, Progress, Reporter, add_throughput
    from ce_ray.training.instrument import WorkerStats, start_score_key

    # [1] The job, and this worker's place in the group.
    job = job_from_dict(config["job"])
    prepared = PreparedData.from_dict(config["data"])
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    task = TASKS[job.task]
    stats = WorkerStats(config["stats_dir"], rank, world_size, job.run.log_row_ids)

    # [2] Model: loaded on CPU; the trainer moves it to this worker's device. Seeded first, so a new
    #     head starts the same on every rank and in every run. On CPU, use the cores this worker
    #     reserved (Ray would otherwise leave torch with one thread). The card data (base model, task,
    #     data name) starts the model card that the trainer fills in.
    set_seed(job.train.seed)
    if not job.scaling.use_gpu:
        import torch

        torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    model = load_cross_encoder(job.model, job.task, device="cpu", model_card_data=card_data(job))
    set_pad_multiple(model, pad_multiple(job))

    # [3] Data: memory-mapped Arrow files; HF's distributed sampler hands this rank its shard.
    train_dataset = load_prepared(prepared.train.uri)
    eval_rows = load_prepared(prepared.eval.uri).data.table

    # [4] Loss (shaped for the rows) and evaluator (run by rank 0, others lend forward passes). A single
    #     worker keeps its step-0 score beside the prepared eval rows, for the next run or trial from the same
    #     model (with several, rank 0 must not skip an evaluation the other ranks lend their forward passes to).
    start_uri = None
    if world_size == 1:
        root, rows = prepared.eval.uri.rstrip("/").rsplit("/", 1)  # rows: the eval split's content key
        key = start_score_key(job, model, rows, resolve_precision(job.train.precision, job.scaling.use_gpu))
        start_uri = f"{root}/start-score-{fingerprint(key, 'v1')}.json"
    loss = build_loss(job.loss, model, train_dataset.data.table)
    train_dataset = per_source(job, train_dataset)
    evaluator = stats.wrap_evaluator(task.evaluator(eval_rows, job.train.eval_batch_size), start_uri)

    # [5] Arguments: per-worker batch = global batch / world size; resume from Ray's latest checkpoint.
    checkpoint = ray.train.get_checkpoint()
    local_dir = tempfile.mkdtemp(prefix=f"ce_ray_rank{rank}_")  # per rank: no two ranks share a dir
    args = training_arguments(job, world_size, local_dir, resuming=checkpoint is not None)
    # TensorBoard events (rank 0 writes them) go to a local folder, published next to the stats at the end
    os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(local_dir, "tensorboard")

    # [6] Trainer, wired to Ray Train.
    callbacks: list = [Reporter(rank, world_size)]
    if rank == 0 and config.get("progress") is not None:
        callbacks.append(Progress(config["progress"], world_size))
    stopper = None
    if job.train.early_stopping_patience:
        stopper = EarlyStopping(task.tune_metric, task.mode, job.train.early_stopping_patience)
        callbacks.append(stopper)
    trainer = CrossEncoderTrainer(
        model=model, args=args, train_dataset=train_dataset, loss=loss, evaluator=evaluator, callbacks=callbacks
    )
    add_throughput(trainer, world_size)  # samples/s in every training log (TensorBoard, MLflow, W&B, ...)
    trainer = prepare_trainer(trainer)
    stats.attach(trainer)

    # [7] Train (the evaluation at step 0 is the baseline; a resumed run already has it).
    if checkpoint is not None:
        with checkpoint.as_directory() as ckpt_dir:
            output = trainer.train(resume_from_checkpoint=os.path.join(ckpt_dir, CHECKPOINT_SUBDIR))
    else:
        output = trainer.train()

    stats.finish(trainer, output, resumed=checkpoint is not None, early_stopped_at=stopper.stopped_at if stopper else None)
    events = os.path.join(local_dir, "tensorboard")
    log_dir = config.get("log_dir")
    if log_dir and rank == 0 and os.path.isdir(events) and os.listdir(events):  # one folder per attempt
        storage.publish_dir(events, storage.join(log_dir, f"attempt-{time.strftime('%Y%m%dT%H%M%S')}"))
    shutil.rmtree(local_dir, ignore_errors=True)


def per_source(job: JobConfig, dataset):
    """``data.mix: proportional | round_robin``: the prepared rows as one dataset per source (by their ``source``
    column), which the trainer draws batches from with sentence-transformers' multi-dataset batch sampler; else as is."""
    if "source" not in dataset.column_names:
        return dataset
    from datasets import DatasetDict

    index = dataset.data.table.column("source").to_numpy()
    rows = dataset.remove_columns("source")
    return DatasetDict(
        {src.label(): rows.select((index == i).nonzero()[0]) for i, src in enumerate(job.data.train_sources)}
    )


def training_arguments(job: JobConfig, world_size: int, output_dir: str, resuming: bool):
    """``CrossEncoderTrainingArguments`` for one worker of a ``world_size``-worker run."""
    from sentence_transformers.base.sampler import BatchSamplers, MultiDatasetBatchSamplers
    from sentence_transformers.cross_encoder import CrossEncoderTrainingArguments

    from ce_ray.training.batching import LengthGroupedBatchSampler

    t, run = job.train, job.run
    precision = resolve_precision(t.precision, job.scaling.use_gpu)
    if LOSSES[job.loss.name].in_batch:  # in-batch negatives must not be duplicates of the positive
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
        report_to=[r for r in run.report_to if r != "none"] or "none",  # HF logs from rank 0 only
        disable_tqdm=True,
        batch_sampler=sampler,
        multi_dataset_batch_sampler=(
            MultiDatasetBatchSamplers.ROUND_ROBIN if job.data.mix == "round_robin" else MultiDatasetBatchSamplers.PROPORTIONAL
        ),  # only read for a data.mix that gives one dataset per source (per_source)
        torch_compile=t.compile,
        optim=t.optimizer,
    )


def pad_multiple(job: JobConfig) -> int | None:
    """``train.pad_to_multiple_of``, or its default: 8 on GPU (tensor-core friendly shapes), none on CPU."""
    if job.train.pad_to_multiple_of is not None:
        return job.train.pad_to_multiple_of
    return 8 if job.scaling.use_gpu else None


def _supports_tf32() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8
