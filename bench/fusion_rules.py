"""Which fusion rule should a reranker and its retriever share? Chosen on the tune half, the test half scored once.

Every rule ranks one query's (one request's) documents by a weighted sum of the cross-encoder's logit and the
retriever's cosine, each put on a common scale first; the weight of each rule is fitted on the eval rows (the tune
half of qa/dev) by NDCG@10, as ``ce_ray.fusion.fit_weight`` fits the shipped one:

- ``zscore``: each score standardised over the query's documents (what ``serve.fusion`` serves for a model without
  fitted scales);
- ``minmax``: each score mapped to [0, 1] over the query's documents;
- ``rank``: reciprocal-rank fusion, ``1 / (60 + rank)`` of each scorer;
- ``fixed``: no per-query statistics: each score standardised by its mean and standard deviation over all eval
  pairs (a calibrated linear rule, which ranks as a logistic regression on the two scores would). What ce-ray fits
  and serves (``ce_ray.fusion``, ``normalisation: fixed-scales``).

The table lists every rule's eval (tune-half) NDCG@10 at its fitted weight. The test half is scored for the shipped
rule and for the rule the eval rows pick, and for no other, so the choice never sees the test rows.

    python bench/fusion_rules.py --job jobs/rerank_tune.yaml --set run.output_dir=runs --model runs/rerank-tune/best
"""

from __future__ import annotations

import argparse
import os

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 1e-12 else np.zeros_like(x)


def _rank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(-x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    return 1.0 / (60.0 + ranks)


def _each(scale):
    """The rule that puts each scorer's scores of one query on ``scale``, then weighs them."""
    return lambda logits, cosines, w: (1 - w) * scale(np.asarray(logits)) + w * scale(np.asarray(cosines))


def rules(eval_queries: list[dict]) -> dict:
    """name -> rule(logits, cosines, weight) -> fused scores of one query; zscore and fixed are ce-ray's own."""
    from ce_ray.fusion import fit_scales, fused_scores

    scales = fit_scales(eval_queries)
    return {
        "zscore": fused_scores,
        "minmax": _each(_minmax),
        "rank": _each(_rank),
        "fixed": lambda logits, cosines, w: fused_scores(logits, cosines, w, scales),
    }


def score(queries: list[dict], rule, weight: float) -> float:
    from ce_ray.fusion import rerank_metrics

    return rerank_metrics([(rule(q["logits"], q["cosines"], weight), q["positives"]) for q in queries])["ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/rerank_tune.yaml")
    parser.add_argument("--set", action="append", default=[], help="job overrides, as for ce-ray")
    parser.add_argument("--model", required=True, help="the reranker's model directory (a run's final/ or best/)")
    args = parser.parse_args()

    from ce_ray.config import load_job
    from ce_ray.data import prepare_split
    from ce_ray.fusion import WEIGHTS, pick_weight
    from ce_ray.modeling import load_for_inference
    from ce_ray.quality import _scored_queries

    job = load_job(args.job, args.set).for_run()
    model = load_for_inference(args.model)
    eval_queries = _scored_queries(job, model, prepare_split(job, "eval"))
    found = {}
    for name, rule in rules(eval_queries).items():
        curve = {w: score(eval_queries, rule, w) for w in WEIGHTS}
        weight = pick_weight(curve)
        found[name] = (weight, curve[weight], rule)
    chosen = max(found, key=lambda n: found[n][1])
    test_queries = _scored_queries(job, model, prepare_split(job, "test"))
    print(f"\n{'rule':8} {'weight':>6} {'eval NDCG@10':>13} {'test NDCG@10':>13}")
    for name, (weight, value, rule) in found.items():
        test = f"{score(test_queries, rule, weight):13.4f}" if name in ("fixed", chosen) else f"{'-':>13}"
        print(f"{name:8} {weight:6.2f} {value:13.4f} {test}" + ("   <- chosen on eval" if name == chosen else ""))
    print(f"pure model: eval {score(eval_queries, found['zscore'][2], 0.0):.4f}, test {score(test_queries, found['zscore'][2], 0.0):.4f}")


if __name__ == "__main__":
    main()
