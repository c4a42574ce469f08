"""Fusion of a reranker with its retriever: one fixed rule, its weight fitted on the eval rows, reported apart.

The fused score of a (query, document) is

    (1 - w) * z(cross-encoder logit) + w * z(retriever cosine)

where ``z`` standardises each score over the documents of the same query (in serving: of the same request),
so the two scales meet without a calibration set. ``w`` is picked on the **eval** rows from a grid of 0, 0.05,
..., 1 by the task's metric (NDCG@10); ``w = 0`` is the pure model, so on the eval rows fusion never loses to
it. The test rows are then scored once with that weight and reported as "fused", next to (never instead of)
the pure model and the retriever.

Pure functions over scores (no model loading) plus :func:`rerank_metrics`, which computes MAP, MRR@10 and
NDCG@10 exactly as sentence-transformers' ``CrossEncoderRerankingEvaluator`` does (its ``compute_metrics``,
candidates in the order positives then negatives), so fused and pure numbers are comparable.
:func:`fused_scores` is what a serving replica applies to one request.

This module imports only numpy, so the serving replicas can import it without the training stack.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

__all__ = ["NORMALISATION", "WEIGHTS", "fit_weight", "fused_scores", "pick_weight", "rerank_metrics", "zscores"]

NORMALISATION = "zscore-per-query"
WEIGHTS = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1


def zscores(values: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over one query's documents; all zeros when they are all equal (or only one)."""
    values = np.asarray(values, dtype=np.float64)
    std = values.std()
    return (values - values.mean()) / std if std > 1e-12 else np.zeros_like(values)


def fused_scores(logits: np.ndarray, cosines: np.ndarray, weight: float) -> np.ndarray:
    """The fused scores of one query's (or request's) documents (see the module docstring)."""
    if weight <= 0:
        return zscores(logits)
    if weight >= 1:
        return zscores(cosines)
    return (1.0 - weight) * zscores(logits) + weight * zscores(cosines)


@functools.lru_cache(maxsize=4)
def _evaluator(at_k: int):
    """One evaluator per k, for its ``compute_metrics`` (building one costs ~0.2 s; the weight fit asks hundreds of times)."""
    from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator

    return CrossEncoderRerankingEvaluator([{"query": "", "positive": [""], "negative": []}], at_k=at_k)


def rerank_metrics(groups: list[tuple[np.ndarray, int]], at_k: int = 10) -> dict[str, float]:
    """MAP, MRR@k and NDCG@k of scored queries, each ``(scores, num_positives)`` with the positives first.

    Computed with ``CrossEncoderRerankingEvaluator.compute_metrics`` of sentence-transformers, the function the
    evaluator applies to a model's scores.
    """
    evaluator = _evaluator(at_k)
    mrr, ndcg, ap = [], [], []
    for scores, positives in groups:
        relevant = [1] * positives + [0] * (len(scores) - positives)
        m, n, a = evaluator.compute_metrics(relevant, np.asarray(scores))
        mrr.append(m)
        ndcg.append(n)
        ap.append(a)
    return {"map": float(np.mean(ap)), f"mrr@{at_k}": float(np.mean(mrr)), f"ndcg@{at_k}": float(np.mean(ndcg))}


def _metrics_at(queries: list[dict[str, Any]], weight: float) -> dict[str, float]:
    return rerank_metrics([(fused_scores(q["logits"], q["cosines"], weight), q["positives"]) for q in queries])


def fit_weight(eval_queries: list[dict[str, Any]], metric: str = "ndcg@10") -> tuple[float, dict[float, float]]:
    """The weight of :data:`WEIGHTS` with the best ``metric`` on the eval queries (the smaller on a tie, so 0
    unless fusion helps), and the metric at every weight.

    Each query is ``{"logits": [...], "cosines": [...], "positives": n}`` with its positives first.
    """
    curve = {w: _metrics_at(eval_queries, w)[metric] for w in WEIGHTS}
    return pick_weight(curve), curve


def pick_weight(curve: dict[float, float]) -> float:
    """The weight with the best metric on ``curve`` (weight -> metric), the smaller on a tie (so 0 unless fusion helps)."""
    return max(curve, key=lambda w: (round(curve[w], 10), -w))


def fusion_report(
    eval_queries: list[dict[str, Any]], test_queries: list[dict[str, Any]] | None, retriever: str, metric: str = "ndcg@10"
) -> dict[str, Any]:
    """Fit the weight on the eval queries and score eval (and test) with it: what ``ce_ray_quality.json`` keeps."""
    weight, curve = fit_weight(eval_queries, metric)
    return {
        "weight": weight,
        "normalisation": NORMALISATION,
        "retriever": retriever,
        "fitted_on": "eval",
        "eval": _metrics_at(eval_queries, weight),
        "test": _metrics_at(test_queries, weight) if test_queries else None,
        "eval_curve": {f"{w:g}": round(v, 4) for w, v in curve.items()},
    }
