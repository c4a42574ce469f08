"""Step 4 of preparing rerank data: hard negatives for queries that have none.

:func:`needs_mining` decides from the loss (:data:`ce_ray.tasks.LOSSES`) and ``data.negatives.mine``;
:func:`mine_negatives` runs sentence-transformers' ``mine_hard_negatives`` with the
``data.negatives.model`` bi-encoder; :func:`with_eval_negatives` does the same for eval/test rows
without negatives (as the notebook does). Caching the result is :mod:`ce_ray.data.prepare`'s job.
"""

from __future__ import annotations

import logging

import pyarrow as pa

from ce_ray.config import NegativesConfig
from ce_ray.data.errors import DataError
from ce_ray.data.groups import RerankGroups
from ce_ray.tasks import LossSpec

__all__ = ["mine_negatives", "needs_mining", "with_eval_negatives"]

logger = logging.getLogger(__name__)


def needs_mining(spec: LossSpec, groups: RerankGroups, mode: str) -> bool:
    """Whether loss ``spec`` needs mined negatives for these rows (``mode`` = ``data.negatives.mine``).

    Raises:
        DataError: the loss needs teacher scores the rows lack, or negatives that may not be mined.
    """
    if spec.needs_scores and groups.kind != "scores":
        raise DataError(
            f"train.loss: {spec.name} learns from teacher scores, but data.train has no 'score' column; "
            "give rows (query, passage, score) or pick BinaryCrossEntropyLoss/ListNetLoss/LambdaLoss"
        )
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


def mine_negatives(
    groups: RerankGroups, cfg: NegativesConfig, device: str | None = None, corpus: list[str] | None = None
) -> RerankGroups:
    """Add hard negatives to positive-only groups with sentence-transformers' ``mine_hard_negatives``.

    Every (query, positive) pair is searched against all positives of the dataset (plus ``corpus``, e.g. the
    positives of other training sources) with the bi-encoder ``cfg.model``; candidates that are the query's own
    positives are excluded by the library. Queries for which too few candidates pass the filters keep only what
    was found.
    """
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from ce_ray.modeling import resolve_model_name

    pairs_q, pairs_p = [], []
    for q, ds, labs in zip(groups.queries, groups.docs, groups.labels):
        for d, lab in zip(ds, labs):
            if lab > 0:
                pairs_q.append(q)
                pairs_p.append(d)
    if not pairs_q:
        raise DataError("data.train: no positive pairs to mine negatives for")
    encoder = SentenceTransformer(resolve_model_name(cfg.model), device=device)
    dataset = Dataset.from_dict({"query": pairs_q, "positive": pairs_p})
    pool = len(set(pairs_p) | set(corpus or ()))
    mined = mine_hard_negatives(
        dataset,
        encoder,
        corpus=list(corpus) if corpus else None,
        range_min=cfg.range_min,
        range_max=min(cfg.range_max, max(pool - 1, 1)),
        max_score=cfg.max_score,
        relative_margin=cfg.relative_margin,
        num_negatives=cfg.num,
        sampling_strategy=cfg.sampling,
        batch_size=cfg.batch_size,
        output_format="labeled-list",
        verbose=False,
    )
    by_query: dict[str, tuple[list[str], list[float]]] = {}
    for row in mined:
        docs, labels = by_query.setdefault(row["query"], ([], []))
        for d, lab in zip(row[mined.column_names[1]], row[mined.column_names[2]]):
            if d not in docs:
                docs.append(d)
                labels.append(float(lab))
    docs_out, labels_out = [], []
    for q, ds, labs in zip(groups.queries, groups.docs, groups.labels):
        extra_docs, extra_labels = by_query.get(q, ([], []))
        merged_docs, merged_labels = list(ds), list(labs)
        for d, lab in zip(extra_docs, extra_labels):
            if d not in merged_docs:
                merged_docs.append(d)
                merged_labels.append(lab)
        docs_out.append(merged_docs)
        labels_out.append(merged_labels)
    found = sum(sum(1 for lab in labs if lab <= 0) for labs in labels_out)
    logger.info("mined %d hard negatives for %d queries with %s", found, len(groups.queries), cfg.model)
    return RerankGroups(list(groups.queries), docs_out, labels_out, groups.kind)


def with_eval_negatives(table: pa.Table, cfg: NegativesConfig, device: str | None = None) -> pa.Table:
    """Checked rerank eval rows, where a query lacks negatives, get ``cfg.eval_num`` mined ones."""
    cols = table.to_pydict()
    if all(cols["negative"]):
        return table
    groups = RerankGroups(
        cols["query"],
        [list(p) + list(n) for p, n in zip(cols["positive"], cols["negative"])],
        [[1.0] * len(p) + [0.0] * len(n) for p, n in zip(cols["positive"], cols["negative"])],
        "binary",
    )
    mined = mine_negatives(groups, cfg.model_copy(update={"num": cfg.eval_num}), device=device)
    return pa.table(
        {
            "query": mined.queries,
            "positive": [[d for d, lab in zip(ds, labs) if lab > 0] for ds, labs in zip(mined.docs, mined.labels)],
            "negative": [[d for d, lab in zip(ds, labs) if lab <= 0] for ds, labs in zip(mined.docs, mined.labels)],
        },
        schema=table.schema,
    )
