"""Every loss ce-ray can train with, the data each one needs, and how it gets it.

The data's shape decides the loss (sentence-transformers' rule: label columns are named
label/labels/score, all other columns are inputs by position). Each :class:`LossSpec` says which
shape its loss takes and whether the data must carry negatives or teacher scores; :func:`shape_rows`
builds that shape from checked rows, mining hard negatives (``data.negatives``) when the loss needs
them and the data is positive-only.

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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from ce_ray.config import JobConfig, LossConfig
from ce_ray.data import CheckedRows, DataError, RerankGroups, mine_negatives, rerank_groups

if TYPE_CHECKING:
    import torch
    from sentence_transformers.cross_encoder import CrossEncoder

__all__ = ["LOSSES", "LossSpec", "build_loss", "needs_mining", "shape_rows"]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------------
def _pair_class(rows: CheckedRows, groups: RerankGroups | None, job: JobConfig) -> pa.Table:
    return rows.table.select(["premise", "hypothesis", "label"])


def _labeled_pair(groups: RerankGroups, job: JobConfig, scores: bool) -> pa.Table:
    queries, passages, labels = [], [], []
    top = max((max(lab) for lab in groups.labels), default=1.0)
    for q, ds, labs in zip(groups.queries, groups.docs, groups.labels):
        for d, lab in zip(ds, labs):
            queries.append(q)
            passages.append(d)
            labels.append(lab)
    if not scores:
        if groups.kind == "scores" and (min(labels) < 0 or max(labels) > 1):
            raise DataError(
                "train.loss: BinaryCrossEntropyLoss needs labels in [0, 1] but data.train has teacher scores "
                f"from {min(labels):.3g} to {max(labels):.3g}; use MSELoss or MarginMSELoss for scores"
            )
        if groups.kind == "graded":
            labels = [lab / top for lab in labels]  # relevance levels -> [0, 1]
    column = "score" if scores else "label"
    return pa.table({"query": queries, "passage": passages, column: pa.array(labels, pa.float32())})


def _n_tuple(groups: RerankGroups, job: JobConfig) -> pa.Table:
    negatives = [[d for d, lab in zip(ds, labs) if lab <= 0] for ds, labs in zip(groups.docs, groups.labels)]
    n = min((len(neg) for neg in negatives), default=0)
    n = min(n, job.data.negatives.num) if n else 0
    cols: dict[str, list[str]] = {"query": [], "positive": []}
    for i in range(n):
        cols[f"negative_{i + 1}"] = []
    for q, ds, labs, negs in zip(groups.queries, groups.docs, groups.labels, negatives):
        for d, lab in zip(ds, labs):
            if lab > 0:
                cols["query"].append(q)
                cols["positive"].append(d)
                for i in range(n):
                    cols[f"negative_{i + 1}"].append(negs[i])
    return pa.table(cols)


def _labeled_list(groups: RerankGroups, job: JobConfig) -> pa.Table:
    keep = [i for i, labs in enumerate(groups.labels) if len(labs) > 1 and max(labs) > min(labs)]
    if not keep:
        raise DataError("data.train: no query has both relevant and irrelevant documents, so a listwise loss has nothing to learn")
    return pa.table(
        {
            "query": [groups.queries[i] for i in keep],
            "docs": [groups.docs[i] for i in keep],
            "labels": pa.array([groups.labels[i] for i in keep], pa.list_(pa.float32())),
        }
    )


def _margin_triplets(groups: RerankGroups, job: JobConfig) -> pa.Table:
    cols: dict[str, list] = {"query": [], "doc_a": [], "doc_b": [], "label": []}
    for q, ds, scores in zip(groups.queries, groups.docs, groups.labels):
        if len(ds) < 2:
            continue
        best = max(range(len(ds)), key=scores.__getitem__)
        for j, (d, s) in enumerate(zip(ds, scores)):
            if j != best:
                cols["query"].append(q)
                cols["doc_a"].append(ds[best])
                cols["doc_b"].append(d)
                cols["label"].append(scores[best] - s)
    if not cols["query"]:
        raise DataError("data.train: MarginMSELoss needs at least two scored passages for some query")
    cols["label"] = pa.array(cols["label"], pa.float32())
    return pa.table(cols)


# --------------------------------------------------------------------------------------------
# builders
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
    if isinstance(cfg.pos_weight, float):
        return cfg.pos_weight
    labels = table.column("label").to_pylist()
    positives = sum(1 for lab in labels if lab >= 0.5)
    return (len(labels) - positives) / positives if positives else None


def _build_bce(model: CrossEncoder, cfg: LossConfig, table: pa.Table) -> Any:
    import torch
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    weight = bce_pos_weight(cfg, table)
    return BinaryCrossEntropyLoss(model, pos_weight=None if weight is None else torch.tensor(weight))


def _build_mnrl(model: CrossEncoder, cfg: LossConfig, table: pa.Table) -> Any:
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss

    kwargs = {k: v for k, v in (("num_negatives", cfg.num_negatives), ("scale", cfg.scale)) if v is not None}
    return MultipleNegativesRankingLoss(model, **kwargs)


def _build_cached_mnrl(model: CrossEncoder, cfg: LossConfig, table: pa.Table) -> Any:
    from sentence_transformers.cross_encoder.losses import CachedMultipleNegativesRankingLoss

    options = (("num_negatives", cfg.num_negatives), ("scale", cfg.scale), ("mini_batch_size", cfg.mini_batch_size))
    return CachedMultipleNegativesRankingLoss(model, **{k: v for k, v in options if v is not None})


def _build_lambda(model: CrossEncoder, cfg: LossConfig, table: pa.Table) -> Any:
    from sentence_transformers.cross_encoder.losses import LambdaLoss

    return LambdaLoss(model, k=cfg.k, mini_batch_size=cfg.mini_batch_size)


def _build_listnet(model: CrossEncoder, cfg: LossConfig, table: pa.Table) -> Any:
    from sentence_transformers.cross_encoder.losses import ListNetLoss

    return ListNetLoss(model, mini_batch_size=cfg.mini_batch_size)


def _build_mse(model: CrossEncoder, cfg: LossConfig, table: pa.Table) -> Any:
    from sentence_transformers.cross_encoder.losses import MSELoss

    return MSELoss(model)


def _build_margin_mse(model: CrossEncoder, cfg: LossConfig, table: pa.Table) -> Any:
    from sentence_transformers.cross_encoder.losses import MarginMSELoss

    return MarginMSELoss(model)


@dataclass(frozen=True)
class LossSpec:
    """One loss: its data shape, what the data must hold, and how to build it."""

    name: str
    task: str
    shape: str  # pair-class | labeled-pair | n-tuple | labeled-list | margin-triplet | scored-pair
    needs_negatives: bool
    needs_scores: bool
    build: Callable[[CrossEncoder, LossConfig, pa.Table], Any]


LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        LossSpec("CrossEntropyLoss", "nli", "pair-class", False, False, _build_ce),
        LossSpec("BinaryCrossEntropyLoss", "rerank", "labeled-pair", True, False, _build_bce),
        LossSpec("MultipleNegativesRankingLoss", "rerank", "n-tuple", False, False, _build_mnrl),
        # the same loss with gradient caching: memory bounded by mini_batch_size at any batch size
        LossSpec("CachedMultipleNegativesRankingLoss", "rerank", "n-tuple", False, False, _build_cached_mnrl),
        LossSpec("LambdaLoss", "rerank", "labeled-list", True, False, _build_lambda),
        LossSpec("ListNetLoss", "rerank", "labeled-list", True, False, _build_listnet),
        LossSpec("MSELoss", "rerank", "scored-pair", False, True, _build_mse),
        LossSpec("MarginMSELoss", "rerank", "margin-triplet", False, True, _build_margin_mse),
    )
}


def needs_mining(job: JobConfig, groups: RerankGroups) -> bool:
    """Whether ``job``'s loss needs mined negatives for these rows (raises if it needs them but may not mine)."""
    spec = LOSSES[job.loss.name]
    if spec.needs_scores and groups.kind != "scores":
        raise DataError(
            f"train.loss: {spec.name} learns from teacher scores, but data.train has no 'score' column; "
            "give rows (query, passage, score) or pick BinaryCrossEntropyLoss/ListNetLoss/LambdaLoss"
        )
    mode = job.data.negatives.mine
    if spec.needs_scores:
        return False
    if spec.needs_negatives and not groups.has_negatives:
        if mode == "never":
            raise DataError(
                f"train.loss: {spec.name} needs negatives but data.train has positive pairs only and "
                "data.negatives.mine is never; set it to auto, add negatives, or use MultipleNegativesRankingLoss"
            )
        return True
    return mode == "always" and not groups.has_negatives


def shape_rows(job: JobConfig, rows: CheckedRows, groups: RerankGroups | None = None, device: str | None = None) -> pa.Table:
    """Checked training rows → the exact columns of ``job``'s loss (mining negatives if needed).

    Args:
        job: the job (task, loss, ``data.negatives``).
        rows: checked training rows.
        groups: rerank rows already grouped (and possibly mined) to reuse, e.g. across tune trials.
        device: device for the mining bi-encoder.
    """
    spec = LOSSES[job.loss.name]
    if job.task == "nli":
        return _pair_class(rows, None, job)
    if groups is None:
        groups = rerank_groups(rows)
        if needs_mining(job, groups):
            groups = mine_negatives(groups, job.data.negatives, device=device)
    else:
        needs_mining(job, groups)  # still raise for a loss that cannot use these rows
    if spec.shape == "labeled-pair":
        return _labeled_pair(groups, job, scores=False)
    if spec.shape == "scored-pair":
        return _labeled_pair(groups, job, scores=True)
    if spec.shape == "n-tuple":
        return _n_tuple(groups, job)
    if spec.shape == "labeled-list":
        return _labeled_list(groups, job)
    return _margin_triplets(groups, job)


def build_loss(job: JobConfig, model: CrossEncoder, table: pa.Table) -> Any:
    """The sentence-transformers loss for ``job.train.loss``, set up for the shaped ``table``."""
    return LOSSES[job.loss.name].build(model, job.loss, table)
