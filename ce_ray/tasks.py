"""The one registry of what ce-ray trains: its tasks and every loss, each fact written once.

Config validation (which losses fit a task, which options a loss takes), data shaping (the columns a
loss trains on, whether it needs negatives or teacher scores), the default tune search and the docs
(``ce-ray validate --help-keys``) all read :data:`TASKS` and :data:`LOSSES`. Adding a loss is one
:class:`LossSpec` entry in :data:`LOSSES` (plus a shaper in :mod:`ce_ray.data.shape` if its data
shape is new).

=========  ============  ====================================  ==========================  ======
task       num_labels    evaluator (sentence-transformers)     metrics                     tune
=========  ============  ====================================  ==========================  ======
nli        3             CrossEncoderClassificationEvaluator   accuracy, f1_macro, ...     accuracy (max)
rerank     1             CrossEncoderRerankingEvaluator        map, mrr@10, ndcg@10        ndcg@10 (max)
=========  ============  ====================================  ==========================  ======

=============================  ======  ====================================  ========================  =============
loss                           task    inputs (columns, in order)            label column              needs
=============================  ======  ====================================  ========================  =============
CrossEntropyLoss               nli     premise, hypothesis                   label (class id)          -
BinaryCrossEntropyLoss         rerank  query, passage                        label (1 rel / 0 not)     negatives*
MultipleNegativesRankingLoss   rerank  query, positive[, negative_1..n]      none (in-batch)           -
CachedMultipleNegatives...     rerank  (same; mini_batch_size bounds memory)  none (in-batch)           -
LambdaLoss                     rerank  query, docs (list)                    labels (list)             negatives*
ListNetLoss                    rerank  query, docs (list)                    labels (list)             negatives*
MSELoss                        rerank  query, passage                        score (teacher)           scores
MarginMSELoss                  rerank  query, doc_a, doc_b                   label (score_a - score_b) scores
=============================  ======  ====================================  ========================  =============

\\* mined with ``mine_hard_negatives`` from positive-only pairs when ``data.negatives.mine`` is
auto/always. A BCE model trained on positives alone learns to say "relevant" to everything; the
notebook's claim that BCE gets in-batch negatives is wrong (only MultipleNegativesRankingLoss does).

Metric names come back unprefixed from :meth:`Task.evaluate`; inside training the trainer prefixes
them with ``eval_`` (``eval_accuracy``), which is also the name Tune sees.

This module imports no other ce-ray module and no heavy library at import time (the job schema reads it).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

# A job's ``train.loss`` (``ce_ray.config.LossConfig``: ``name`` plus the options below); the schema reads
# this module, so this module does not import the schema.
LossConfig = Any

__all__ = ["LOSSES", "LOSS_OPTIONS", "NLI", "RERANK", "TASKS", "LossSpec", "Task", "best_by", "losses_for", "plain_metrics"]


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------
def _nli_evaluator_class():
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderClassificationEvaluator

    class NLIEvaluator(CrossEncoderClassificationEvaluator):
        """The library's classification evaluator plus ``accuracy``, which it leaves out for >2 classes.

        Returns ``accuracy``, ``f1_macro``, ``f1_micro``, ``f1_weighted``; ``primary_metric`` is accuracy.
        """

        def __call__(self, model, output_path=None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
            metrics = super().__call__(model, output_path=output_path, epoch=epoch, steps=steps)
            prefix = f"{self.name}_" if self.name else ""
            # For single-label multi-class data, micro F1 is exactly accuracy.
            metrics = {f"{prefix}accuracy": metrics[f"{prefix}f1_micro"], **metrics}
            self.primary_metric = f"{prefix}accuracy"
            self.store_metrics_in_model_card_data(model, metrics, epoch, steps)  # the model card shows accuracy too
            return metrics

    return NLIEvaluator


@dataclass(frozen=True)
class Task:
    """What differs between tasks: outputs, labels, default loss, evaluator and the metric Tune optimises."""

    name: str
    num_labels: int
    default_loss: str
    primary_metric: str
    mode: str = "max"
    labels: tuple[str, ...] | None = None
    description: str = ""

    def evaluator(self, table: pa.Table, batch_size: int = 64, name: str = "") -> Any:
        """The sentence-transformers evaluator for checked eval/test rows (``CheckedRows.table``)."""
        cols = table.to_pydict()
        if self.name == "nli":
            return _nli_evaluator_class()(
                list(zip(cols["premise"], cols["hypothesis"])),
                cols["label"],
                name=name,
                batch_size=batch_size,
                write_csv=False,
            )
        from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

        samples = [
            {"query": q, "positive": list(p), "negative": list(n)}
            for q, p, n in zip(cols["query"], cols["positive"], cols["negative"])
        ]
        return CrossEncoderRerankingEvaluator(samples, at_k=10, name=name, batch_size=batch_size, write_csv=False)

    def evaluate(self, model: CrossEncoder, table: pa.Table, batch_size: int = 64) -> dict[str, float]:
        """Score ``model`` on checked rows; plain metric names (``accuracy``, ``ndcg@10``...)."""
        import numpy as np

        metrics = self.evaluator(table, batch_size)(model)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}

    @property
    def tune_metric(self) -> str:
        """The metric as reported during training (``eval_`` prefix)."""
        return f"eval_{self.primary_metric}"


NLI = Task(
    "nli",
    num_labels=3,
    default_loss="CrossEntropyLoss",
    primary_metric="accuracy",
    labels=("entailment", "neutral", "contradiction"),
    description="3-class (premise, hypothesis, label)",
)
RERANK = Task(
    "rerank",
    num_labels=1,
    default_loss="BinaryCrossEntropyLoss",
    primary_metric="ndcg@10",
    description="query/passage relevance (1 output)",
)
TASKS: dict[str, Task] = {task.name: task for task in (NLI, RERANK)}


def best_by(items: list, metric: str, mode: str, key: Callable[[Any], dict] = lambda item: item):
    """The item whose ``key(item)[metric]`` is best under ``mode`` (max/min); items without it lose.

    The one place ce-ray picks a best (checkpoint, trial, report row).
    """
    sign = 1 if mode == "max" else -1

    def score(item) -> float:
        value = key(item).get(metric)
        return -math.inf if value is None else sign * value

    return max(items, key=score)


_TIMING_KEYS = ("runtime", "samples_per_second", "steps_per_second")


def plain_metrics(metrics: dict[str, Any], prefix: str = "eval_") -> dict[str, float]:
    """Evaluator metrics under ``prefix`` (``eval_``/``baseline_``) with the prefix removed, timings left out."""
    return {
        k[len(prefix) :]: v
        for k, v in metrics.items()
        if k.startswith(prefix) and k[len(prefix) :] not in _TIMING_KEYS and isinstance(v, (int, float))
    }


# --------------------------------------------------------------------------------------------
# losses: builders (sentence-transformers imported on use)
# --------------------------------------------------------------------------------------------
def _class_weights(cfg: LossConfig, table: pa.Table, num_labels: int) -> torch.Tensor | None:
    import torch

    if cfg.class_weights is None:
        return None
    if isinstance(cfg.class_weights, list):
        return torch.tensor(cfg.class_weights, dtype=torch.float)
    counts = torch.bincount(torch.tensor(table.column("label").to_pylist()), minlength=num_labels).float()
    return counts.sum() / (num_labels * counts.clamp(min=1))


def _build_ce(model: CrossEncoder, cfg: LossConfig, table: pa.Table) -> Any:
    from sentence_transformers.cross_encoder.losses import CrossEntropyLoss

    kwargs: dict[str, Any] = {}
    if cfg.label_smoothing:
        kwargs["label_smoothing"] = cfg.label_smoothing
    weight = _class_weights(cfg, table, model.num_labels)
    if weight is not None:
        kwargs["weight"] = weight
    return CrossEntropyLoss(model, **kwargs)


def bce_pos_weight(cfg: LossConfig, table: pa.Table) -> float | None:
    """``pos_weight`` for BCE: the configured number, or (auto/None) negatives per positive."""
    import pyarrow.compute as pc

    if isinstance(cfg.pos_weight, float):
        return cfg.pos_weight
    labels = table.column("label")
    positives = pc.sum(pc.greater_equal(labels, 0.5)).as_py() or 0
    return (len(labels) - positives) / positives if positives else None


def _build_bce(model: CrossEncoder, cfg: LossConfig, table: pa.Table) -> Any:
    import torch
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    weight = bce_pos_weight(cfg, table)
    return BinaryCrossEntropyLoss(model, pos_weight=None if weight is None else torch.tensor(weight))


def _with_options(loss_class: str, *options: str) -> Callable[[CrossEncoder, LossConfig, pa.Table], Any]:
    """A builder that passes the loss's set options (and only those) to the sentence-transformers class."""

    def build(model: CrossEncoder, cfg: LossConfig, table: pa.Table) -> Any:
        from sentence_transformers.cross_encoder import losses

        kwargs = {name: getattr(cfg, name) for name in options if getattr(cfg, name) is not None}
        return getattr(losses, loss_class)(model, **kwargs)

    return build


@dataclass(frozen=True)
class LossSpec:
    """One loss: its task, data shape, what the data must hold, its options, search membership and builder.

    ``shape`` names a shaper in :mod:`ce_ray.data.shape`: pair-class | labeled-pair | scored-pair |
    n-tuple | labeled-list | margin-triplet. ``default_search`` puts it in the task's default
    ``train.loss`` choice (``needs_scores`` losses only when the data has teacher scores).
    """

    name: str
    task: str
    shape: str
    build: Callable[[CrossEncoder, LossConfig, pa.Table], Any]
    options: tuple[str, ...] = ()
    needs_negatives: bool = False
    needs_scores: bool = False
    default_search: bool = False
    in_batch: bool = False  # learns from the other rows of its batch (no duplicate texts in a batch)
    search_variants: tuple[dict[str, Any], ...] = field(default_factory=tuple)  # extra options tried by default


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec(
            "CrossEntropyLoss", "nli", "pair-class", _build_ce,
            options=("label_smoothing", "class_weights"), default_search=True,
            search_variants=({"label_smoothing": 0.1}, {"class_weights": "balanced"}),
        ),
        LossSpec(
            "BinaryCrossEntropyLoss", "rerank", "labeled-pair", _build_bce,
            options=("pos_weight",), needs_negatives=True, default_search=True,
        ),
        LossSpec(
            "MultipleNegativesRankingLoss", "rerank", "n-tuple",
            _with_options("MultipleNegativesRankingLoss", "num_negatives", "scale"),
            options=("num_negatives", "scale"), in_batch=True,
        ),
        # the same loss with gradient caching: memory bounded by mini_batch_size at any batch size
        LossSpec(
            "CachedMultipleNegativesRankingLoss", "rerank", "n-tuple",
            _with_options("CachedMultipleNegativesRankingLoss", "num_negatives", "scale", "mini_batch_size"),
            options=("num_negatives", "scale", "mini_batch_size"), in_batch=True, default_search=True,
        ),
        LossSpec(
            "LambdaLoss", "rerank", "labeled-list", _with_options("LambdaLoss", "k", "mini_batch_size"),
            options=("k", "mini_batch_size"), needs_negatives=True, default_search=True,
        ),
        LossSpec(
            "ListNetLoss", "rerank", "labeled-list", _with_options("ListNetLoss", "mini_batch_size"),
            options=("mini_batch_size",), needs_negatives=True, default_search=True,
        ),
        LossSpec("MSELoss", "rerank", "scored-pair", _with_options("MSELoss"), needs_scores=True, default_search=True),
        LossSpec(
            "MarginMSELoss", "rerank", "margin-triplet", _with_options("MarginMSELoss"),
            needs_scores=True, default_search=True,
        ),
    )
}

LOSS_OPTIONS: dict[str, tuple[str, ...]] = {}
"""Each loss option and the losses that accept it (derived from :data:`LOSSES`)."""
for _spec in LOSSES.values():
    for _option in _spec.options:
        LOSS_OPTIONS.setdefault(_option, ())
        LOSS_OPTIONS[_option] += (_spec.name,)


def losses_for(task: str) -> tuple[str, ...]:
    """The loss names that fit ``task``, in registry order."""
    return tuple(name for name, spec in LOSSES.items() if spec.task == task)


def default_search_losses(task: str, has_scores: bool = False) -> list[Any]:
    """The default ``train.loss`` choice of a task's search: each member, then its option variants."""
    out: list[Any] = []
    for spec in LOSSES.values():
        if spec.task != task or not spec.default_search or (spec.needs_scores and not has_scores):
            continue
        out.append(spec.name)
        out.extend({"name": spec.name, **variant} for variant in spec.search_variants)
    return out


def build_loss(loss: LossConfig, model: CrossEncoder, table: pa.Table) -> Any:
    """The sentence-transformers loss for ``loss`` (a job's ``train.loss``), set up for the shaped ``table``."""
    return LOSSES[loss.name].build(model, loss, table)
