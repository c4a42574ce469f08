"""How good a trained model is: its test score, the retriever it has to beat, and the verdict.

A reranker is worth deploying only if it ranks better than what the user already has: the
bi-encoder that retrieves (and, in ce-ray, mines negatives with and initialises the cross-encoder
from). :func:`baseline_metrics` scores that bi-encoder zero-shot (the cosine of its embeddings,
:func:`retriever_cosines`) on a prepared eval/test split; the metrics (``map``, ``mrr@10``, ``ndcg@10``)
are computed by ``CrossEncoderRerankingEvaluator.compute_metrics``, as the reranker's are, on the same
candidates. The cosines are cached next to the prepared rows, so tune trials and re-runs embed once, and
fusion (:func:`fuse_with_retriever`) reads the same cosines. Within a process the retriever is loaded
once and a text is embedded once (the eval and test rows often share documents).

:func:`verdict` compares a model with the baseline (on test rows when there are any, else eval),
and :func:`write_model_quality` / :func:`read_model_quality` keep that comparison inside the model
directory (``ce_ray_quality.json``), so ``ce-ray serve`` can warn from the model alone.

Set ``eval.baseline`` to another bi-encoder, or ``none`` to skip it. :func:`model_quality` puts it
together for a staged model (train's ``final/``, tune's ``best/``); :func:`evaluate` scores any model
directory on a job's rows.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from ce_ray import console, storage
from ce_ray.config import JobConfig
from ce_ray.data.prepare import PreparedSplit, cache_root, fingerprint, load_prepared, load_split
from ce_ray.modeling import load_for_inference
from ce_ray.tasks import TASKS

__all__ = [
    "QUALITY_FILE",
    "fuse_with_retriever",
    "retriever_cosines",
    "baseline_metrics",
    "evaluate",
    "model_quality",
    "read_model_quality",
    "score_baseline",
    "verdict",
    "write_model_quality",
]

logger = logging.getLogger(__name__)

QUALITY_FILE = "ce_ray_quality.json"


def baseline_metrics(job: JobConfig, split: PreparedSplit | None, device: str | None = None) -> dict[str, float] | None:
    """Zero-shot retriever metrics on a prepared rerank split; None for nli, ``eval.baseline: none`` or no split."""
    import numpy as np

    from ce_ray.fusion import rerank_metrics

    name = job.baseline_model
    if name is None or split is None:
        return None
    cols = load_prepared(split.uri).data.table.select(["positive"]).to_pydict()
    cosines = retriever_cosines(job, split, device)
    return rerank_metrics([(np.asarray(cos), len(p)) for cos, p in zip(cosines, cols["positive"])])


def verdict(metric: str, model: dict[str, dict[str, float] | None], baseline: dict[str, dict[str, float] | None], baseline_name: str | None) -> dict[str, Any] | None:
    """Model vs baseline on ``metric``: on the test rows when both have them, else on the eval rows.

    Args:
        metric: plain metric name (``ndcg@10``).
        model / baseline: ``{"eval": metrics, "test": metrics}`` (either may be None).

    Returns:
        ``{metric, split, model, baseline, beats, message}``, or None without a baseline.
    """
    for split in ("test", "eval"):
        ours, theirs = (model.get(split) or {}).get(metric), (baseline.get(split) or {}).get(metric)
        if ours is not None and theirs is not None:
            break
    else:
        return None
    beats = ours > theirs
    if beats:
        message = f"the reranker beats the retriever baseline ({baseline_name}) on {split} {metric}: {ours:.4f} vs {theirs:.4f}"
    else:
        message = (
            f"WARNING: the reranker is worse than the retriever baseline ({baseline_name}, zero-shot cosine) on "
            f"{split} {metric}: {ours:.4f} vs {theirs:.4f}. Serving it would rank worse than the bi-encoder alone; "
            "train on more data or longer, or keep the retriever's order."
        )
    return {"metric": metric, "split": split, "model": ours, "baseline": theirs, "beats": beats, "message": message}


def write_model_quality(model_dir: str, quality: dict[str, Any]) -> None:
    """Store the model's scores, the baseline's and the verdict inside a (local) model directory."""
    with open(os.path.join(model_dir, QUALITY_FILE), "w") as f:
        json.dump(quality, f, indent=2, default=str)


def read_model_quality(model_dir: str) -> dict[str, Any] | None:
    """What :func:`write_model_quality` stored, or None for a model ce-ray did not train."""
    path = os.path.join(model_dir, QUALITY_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


_RETRIEVERS: dict[tuple[str, str], Any] = {}
_EMBEDDED: dict[tuple[str, str], dict[str, Any]] = {}  # (model, device) -> text -> unit vector
_EMBEDDED_MAX = 200_000  # texts kept per retriever (384 floats each for MiniLM: ~300 MB at the bound)


def _embed(name: str, texts: list[str], batch_size: int, device: str) -> Any:
    """Unit-length embeddings of ``texts`` by the retriever ``name``: loaded once per process, each text embedded once."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from ce_ray.modeling import resolve_model_name

    key = (name, device)
    if key not in _RETRIEVERS:
        _RETRIEVERS[key] = SentenceTransformer(resolve_model_name(name), device=device)
    seen = _EMBEDDED.setdefault(key, {})
    new = [t for t in dict.fromkeys(texts) if t not in seen]
    if new:
        if len(seen) + len(new) > _EMBEDDED_MAX:
            seen.clear()
        vectors = _RETRIEVERS[key].encode(new, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True)
        seen.update(zip(new, vectors))
    return np.stack([seen[t] for t in texts]) if texts else np.zeros((0, 0), dtype=np.float32)


def retriever_cosines(job: JobConfig, split: PreparedSplit, device: str | None = None) -> list[list[float]]:
    """The retriever's (``eval.baseline``) cosine of each query with each of its candidates, positives first.

    Cached next to the prepared rows, so every run on the same rows embeds once.
    """
    name = job.baseline_model
    uri = storage.join(cache_root(job), f"cosines-{fingerprint({'rows': split.uri, 'model': name}, 'v1')}.json")
    if storage.exists(uri):
        return storage.read_json(uri)
    cols = load_prepared(split.uri).data.table.to_pydict()
    texts = list(dict.fromkeys([*cols["query"], *(d for p, n in zip(cols["positive"], cols["negative"]) for d in [*p, *n])]))
    vectors = _embed(name, texts, job.data.negatives.batch_size, device or "cpu")
    at = {text: i for i, text in enumerate(texts)}
    cosines = [
        (vectors[[at[d] for d in [*p, *n]]] @ vectors[at[q]]).astype(float).tolist()
        for q, p, n in zip(cols["query"], cols["positive"], cols["negative"])
    ]
    storage.write_json(uri, cosines)
    return cosines


def _scored_queries(job: JobConfig, model, split: PreparedSplit) -> list[dict[str, Any]]:
    """Every query of a rerank split with the model's logits, its scores (the logits through the model's activation,
    as ``model.predict`` and the library evaluator give them) and the retriever's cosines (positives first)."""
    import numpy as np
    import torch

    cols = load_prepared(split.uri).data.table.to_pydict()
    pairs = [[q, d] for q, p, n in zip(cols["query"], cols["positive"], cols["negative"]) for d in [*p, *n]]
    logits = model.predict(
        pairs, batch_size=job.train.eval_batch_size, activation_fn=torch.nn.Identity(), convert_to_numpy=True,
        show_progress_bar=False,
    )  # fmt: skip
    # What the library evaluator ranks by: the model's own activation (Sigmoid for one label) on the same fp32 logits
    scores = model.activation_fn(torch.from_numpy(np.asarray(logits, dtype=np.float32))).numpy().reshape(-1)
    cosines = retriever_cosines(job, split)
    out, start = [], 0
    for p, n, cos in zip(cols["positive"], cols["negative"], cosines):
        end = start + len(p) + len(n)
        out.append({
            "logits": np.asarray(logits[start:end], dtype=np.float64).reshape(-1), "scores": scores[start:end],
            "cosines": np.asarray(cos), "positives": len(p),
        })  # fmt: skip
        start = end
    return out


def fuse_with_retriever(job: JobConfig, model, eval_split: PreparedSplit, test_split: PreparedSplit | None) -> dict[str, Any]:
    """Fusion of ``model`` (a loaded CrossEncoder) with the retriever: the weight fitted on the eval rows, the fused
    eval (and test) metrics, and the pure model's test metrics from the same predictions (:mod:`ce_ray.fusion`).

    The pure metrics are ``CrossEncoderRerankingEvaluator``'s on the test rows: the same pairs in the same order,
    one ``predict`` at the same batch size, the model's activation, then its ``compute_metrics``. So a caller that
    fuses need not run the evaluator too (each test pair is scored once)."""
    from ce_ray.fusion import fusion_report, rerank_metrics

    eval_queries = _scored_queries(job, model, eval_split)
    test_queries = _scored_queries(job, model, test_split) if test_split is not None else None
    report = fusion_report(eval_queries, test_queries, job.baseline_model, TASKS[job.task].primary_metric)
    pure_test = rerank_metrics([(q["scores"], q["positives"]) for q in test_queries]) if test_queries else None
    return {"fusion": report, "pure_test": pure_test}


def score_baseline(job: JobConfig, eval_split: PreparedSplit, test_split: PreparedSplit | None) -> None:
    """Score the retriever baseline before training (cached; a bad eval.baseline fails before Ray starts)."""
    if job.baseline_model is None:
        return
    metric = TASKS[job.task].primary_metric
    for split_name, split in (("eval", eval_split), ("test", test_split)):
        metrics = baseline_metrics(job, split)
        if metrics is not None:
            console.say(f"retriever baseline ({job.baseline_model}, zero-shot cosine) on {split_name}: {metric} {metrics[metric]:.4f}")


def model_quality(
    job: JobConfig,
    model_dir: str,
    eval_metrics: dict[str, float],
    eval_split: PreparedSplit,
    test_split: PreparedSplit | None,
) -> dict[str, Any]:
    """Score a staged model on the test rows and set it beside the retriever baseline (written into the model dir).

    A reranker with a baseline is also fused with it (:mod:`ce_ray.fusion`: the weight fitted on the eval rows,
    then the test rows scored once); ``serve.fusion: auto`` serves that weight.

    Returns ``{task, metric, model: {eval, test}, baseline: {model, eval, test}, verdict, fusion}`` (fusion:
    ``{weight, normalisation, retriever, eval, test, eval_curve}`` or None).
    """
    task = TASKS[job.task]
    test = fusion = None
    reranker = load_for_inference(model_dir)
    if job.task == "rerank" and job.baseline_model is not None:  # fused with the retriever, reported apart
        fused = fuse_with_retriever(job, reranker, eval_split, test_split)
        fusion, test = fused["fusion"], fused["pure_test"]  # the pure test metrics from the same predictions
    elif test_split is not None:  # held-out rows, scored once with the exported model (the library's evaluator)
        test_rows = load_prepared(test_split.uri).data.table
        test = task.evaluate(reranker, test_rows, job.train.eval_batch_size)
    baseline = {
        "model": job.baseline_model,
        "eval": baseline_metrics(job, eval_split),
        "test": baseline_metrics(job, test_split),
    }
    model = {"eval": eval_metrics, "test": test}
    quality = {
        "task": job.task,
        "metric": task.primary_metric,
        "model": model,
        "baseline": baseline if job.baseline_model else None,
        "verdict": verdict(task.primary_metric, model, baseline, job.baseline_model) if job.baseline_model else None,
        "fusion": fusion,
    }
    write_model_quality(model_dir, quality)
    return quality


def evaluate(
    job: JobConfig, model: str, split: str = "test", device: str | None = None, key: str | None = None
) -> dict[str, Any]:
    """Score the model directory (or name) ``model`` on ``data.<split>`` of ``job``.

    The rows are read and checked as for training (not cached, no negatives mined; errors name ``key``,
    default ``data.<split>``). Returns the
    task's metrics with plain names (``accuracy``, ``ndcg@10``...) plus ``rows`` and ``dropped``.
    """
    rows = load_split(job, split, key)
    metrics = TASKS[job.task].evaluate(load_for_inference(model, device=device), rows.table, job.train.eval_batch_size)
    return {"rows": rows.num_rows, "dropped": rows.dropped, **metrics}
