"""Step 5 of preparing training data: the exact columns a loss trains on. Pure: rows in, table out.

The data's shape decides the loss (sentence-transformers' rule: label columns are named
label/labels/score, all other columns are inputs by position). Each loss in
:data:`ce_ray.tasks.LOSSES` names its ``shape``; :data:`SHAPERS` builds it from checked NLI rows or
from rerank groups (already grouped and, where the loss needs it, mined by the steps before).
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from ce_ray.data.check import CheckedRows
from ce_ray.data.errors import DataError
from ce_ray.data.groups import RerankGroups
from ce_ray.tasks import LossSpec

__all__ = ["SHAPERS", "shape_rows"]


def _pair_class(rows: CheckedRows) -> pa.Table:
    return rows.table.select(["premise", "hypothesis", "label"])


def _labeled_pair(groups: RerankGroups, scores: bool) -> pa.Table:
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


def _n_tuple(groups: RerankGroups, max_negatives: int) -> pa.Table:
    negatives = [[d for d, lab in zip(ds, labs) if lab <= 0] for ds, labs in zip(groups.docs, groups.labels)]
    n = min((len(neg) for neg in negatives), default=0)
    n = min(n, max_negatives) if n else 0
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


def _labeled_list(groups: RerankGroups) -> pa.Table:
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


def _margin_triplets(groups: RerankGroups) -> pa.Table:
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


SHAPERS: dict[str, Callable[..., pa.Table]] = {
    "labeled-pair": lambda groups, max_negatives: _labeled_pair(groups, scores=False),
    "scored-pair": lambda groups, max_negatives: _labeled_pair(groups, scores=True),
    "n-tuple": _n_tuple,
    "labeled-list": lambda groups, max_negatives: _labeled_list(groups),
    "margin-triplet": lambda groups, max_negatives: _margin_triplets(groups),
}
"""Rerank shapes: ``(groups, max_negatives) -> table``; ``pair-class`` (nli) selects checked rows."""


def shape_rows(spec: LossSpec, rows: CheckedRows, groups: RerankGroups | None, max_negatives: int) -> pa.Table:
    """Checked training rows (and, for rerank, their groups) -> the columns of loss ``spec``.

    Args:
        spec: the loss (its ``shape``).
        rows: checked training rows (nli: used as they are).
        groups: rerank rows grouped by query, with mined negatives where the loss needs them.
        max_negatives: n-tuple losses: most negative columns (``data.negatives.num``).
    """
    if spec.shape == "pair-class":
        return _pair_class(rows)
    assert groups is not None, f"{spec.name}: rerank rows are shaped from their groups"
    return SHAPERS[spec.shape](groups, max_negatives)
