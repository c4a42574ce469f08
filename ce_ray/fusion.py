"""Fusion of a reranker with its retriever: one fixed rule, its weight fitted on the eval rows, reported apart.

The fused logit of a (query, document) is

    a * ((1 - w) * (logit - m_l) / s_l + w * (cosine - m_c) / s_c) + b

- ``m`` and ``s`` are the mean and standard deviation of the cross-encoder's logits and of the retriever's cosines
  over **all** eval pairs (:func:`fit_scales`). They are constants, so a document's fused score does not depend on
  the other documents of its request: a client that splits its documents over several requests, or sends one,
  gets the scores it would get in one request. (A calibrated linear rule: it ranks as a logistic regression on the
  two scores would. In bench/README, "Fusion rules", the tune half picked it over z-scores within each query.)
- ``w`` is picked on the eval rows from a grid of 0, 0.05, ..., 1 by the task's metric (NDCG@10); ``w = 0`` is the
  pure model, so on the eval rows fusion never loses to it.
- ``a`` and ``b`` calibrate the result (:func:`fit_calibration`, a logistic regression of relevance on it over
  the eval pairs): served, ``sigmoid`` of the fused logit is the probability that a document is relevant, at the
  eval rows' mix of positives and negatives. They are fitted at ``w``; at a weight set by hand they are 1 and 0.

The test rows are then scored once with that weight and reported as "fused", next to (never instead of) the pure
model and the retriever. A model whose ``ce_ray_quality.json`` has no scales (fitted before this rule), or one
served with ``serve.fusion: <weight>`` that ce-ray never fitted, is fused with z-scores over the documents of each
request (:data:`PER_REQUEST`) instead.

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

__all__ = [
    "NORMALISATION", "PER_REQUEST", "WEIGHTS", "fit_calibration", "fit_scales", "fit_weight", "fused_scores",
    "pick_weight", "rerank_metrics", "zscores",
]  # fmt: skip

NORMALISATION = "fixed-scales"  # the fitted rule: the eval pairs' means and standard deviations
PER_REQUEST = "zscore-per-query"  # no fitted scales: z-scores over one request's documents
WEIGHTS = tuple(round(0.05 * i, 2) for i in range(21))  # 0, 0.05, ..., 1


def zscores(values: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` over one query's documents; all zeros when they are all equal (or only one)."""
    values = np.asarray(values, dtype=np.float64)
    std = values.std()
    return (values - values.mean()) / std if std > 1e-12 else np.zeros_like(values)


def fit_scales(queries: list[dict[str, Any]]) -> dict[str, float]:
    """The mean and standard deviation of the logits and of the cosines over every pair of ``queries`` (a standard
    deviation of 0, all scores equal, counts as 1)."""
    found = {}
    for key, name in (("logits", "logit"), ("cosines", "cosine")):
        values = np.concatenate([np.asarray(q[key], dtype=np.float64).reshape(-1) for q in queries])
        std = float(values.std())
        found[f"{name}_mean"], found[f"{name}_std"] = float(values.mean()), std if std > 1e-12 else 1.0
    return found


def fused_scores(
    logits: np.ndarray, cosines: np.ndarray, weight: float, scales: dict[str, float] | None = None,
    calibration: dict[str, float] | None = None,
) -> np.ndarray:  # fmt: skip
    """The fused logits of one query's (or request's) documents (see the module docstring); with no ``scales``,
    z-scores over these documents (:data:`PER_REQUEST`)."""
    logits, cosines = np.asarray(logits, dtype=np.float64), np.asarray(cosines, dtype=np.float64)
    if scales is None:
        return (1.0 - weight) * zscores(logits) + weight * zscores(cosines)
    fused = (1.0 - weight) * (logits - scales["logit_mean"]) / scales["logit_std"] + weight * (
        cosines - scales["cosine_mean"]
    ) / scales["cosine_std"]
    if calibration is not None:
        fused = calibration["scale"] * fused + calibration["bias"]
    return fused


def fit_calibration(scores: np.ndarray, labels: np.ndarray, ridge: float = 1e-3) -> dict[str, float]:
    """``{scale, bias}`` of a logistic regression of ``labels`` (1 relevant, 0 not) on ``scores`` (Newton's method,
    a small ridge on the scale so that separable data stay finite). The scale is kept positive: it never reorders."""
    x, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    a, b = 1.0, 0.0
    for _ in range(100):
        p = 0.5 * (1.0 + np.tanh(0.5 * (a * x + b)))  # the sigmoid, without overflow
        r = p * (1.0 - p)
        grad = np.array([np.dot(p - y, x) + ridge * a, np.sum(p - y)])
        hess = np.array([[np.dot(r, x * x) + ridge, np.dot(r, x)], [np.dot(r, x), np.sum(r) + 1e-9]])
        step = np.linalg.solve(hess, grad)
        a, b = a - step[0], b - step[1]
        if not np.isfinite([a, b]).all() or np.abs(step).max() < 1e-10:
            break
    if not np.isfinite([a, b]).all():  # Newton overshot: no calibration rather than a wrong one
        return {"scale": 1.0, "bias": 0.0}
    return {"scale": max(float(a), 1e-6), "bias": float(b)}


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


def _metrics_at(queries: list[dict[str, Any]], weight: float, scales: dict[str, float] | None) -> dict[str, float]:
    return rerank_metrics([(fused_scores(q["logits"], q["cosines"], weight, scales), q["positives"]) for q in queries])


def fit_weight(
    eval_queries: list[dict[str, Any]], metric: str = "ndcg@10", scales: dict[str, float] | None = None
) -> tuple[float, dict[float, float]]:
    """The weight of :data:`WEIGHTS` with the best ``metric`` on the eval queries (the smaller on a tie, so 0
    unless fusion helps), and the metric at every weight; ``scales`` from :func:`fit_scales` (default: those of
    ``eval_queries``).

    Each query is ``{"logits": [...], "cosines": [...], "positives": n}`` with its positives first.
    """
    scales = scales or fit_scales(eval_queries)
    curve = {w: _metrics_at(eval_queries, w, scales)[metric] for w in WEIGHTS}
    return pick_weight(curve), curve


def pick_weight(curve: dict[float, float]) -> float:
    """The weight with the best metric on ``curve`` (weight -> metric), the smaller on a tie (so 0 unless fusion helps)."""
    return max(curve, key=lambda w: (round(curve[w], 10), -w))


def fusion_report(
    eval_queries: list[dict[str, Any]], test_queries: list[dict[str, Any]] | None, retriever: str, metric: str = "ndcg@10"
) -> dict[str, Any]:
    """Fit the scales, the weight and the calibration on the eval queries and score eval (and test) with them: what
    ``ce_ray_quality.json`` keeps."""
    scales = fit_scales(eval_queries)
    weight, curve = fit_weight(eval_queries, metric, scales)
    fused = np.concatenate([fused_scores(q["logits"], q["cosines"], weight, scales) for q in eval_queries])
    labels = np.concatenate([np.arange(len(q["logits"])) < q["positives"] for q in eval_queries])
    return {
        "weight": weight,
        "normalisation": NORMALISATION,
        "scales": scales,  # unrounded: serving applies exactly what was scored here
        "calibration": fit_calibration(fused, labels),
        "retriever": retriever,
        "fitted_on": "eval",
        "eval": _metrics_at(eval_queries, weight, scales),
        "test": _metrics_at(test_queries, weight, scales) if test_queries else None,
        "eval_curve": {f"{w:g}": round(v, 4) for w, v in curve.items()},
    }
