"""Long documents in serving: NDCG@10 with ``serve.long_documents: truncate`` against ``chunk``, on qa/dev.

Every (query, candidate) pair of ``../shared/data/qa/dev.parquet`` is scored the way a replica scores a /rerank
request (:class:`ce_ray.serving.batching.PairScorer`, torch fp32): cut at the model's window (truncate), or split
into windows that each repeat the query and scored as the best one (chunk, at most ``--max-chunks`` windows,
``--overlap`` tokens shared). The table has a row per query set: the queries with a positive longer than the
model's window (the ones chunking can change), and all queries; each for the tune half (first 325 queries), the
test half (last 325) and both. The zero-shot bi-encoder's NDCG@10 on the same rows is the reference.

    python bench/long_documents.py --model runs/rerank-tune/best
    python bench/long_documents.py --model runs/bench-curve/together/train+extra/final --max-chunks 4 8
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEV = REPO.parent / "shared" / "data" / "qa" / "dev.parquet"


def score_all(scorer, queries: pd.DataFrame, max_chunks: int) -> list[np.ndarray]:
    """Each query's logits over its candidates (positives first), scored as a replica scores them."""
    out = []
    for q, pos, neg in zip(queries["query"], queries["positive"], queries["negative"]):
        docs = [*pos, *neg]
        scored = scorer.score([q] * len(docs), docs, chunks=np.full(len(docs), max_chunks))
        out.append(scored.logits.reshape(-1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained reranker dir (or a train/tune output_dir)")
    parser.add_argument("--max-chunks", type=int, nargs="+", default=[8], help="serve.max_chunks_per_doc values")
    parser.add_argument("--overlap", type=int, default=16, help="serve.chunk_overlap_tokens")
    parser.add_argument("--max-query-tokens", type=int, default=64, help="serve.max_query_tokens")
    parser.add_argument("--retriever", default="bundled:all-MiniLM-L6-v2", help="the bi-encoder reference (none: skip)")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from ce_ray.fusion import rerank_metrics
    from ce_ray.modeling import load_for_inference, resolve_model_name
    from ce_ray.serving.batching import PairScorer

    torch.set_num_threads(os.cpu_count() or 1)
    dev = pd.read_parquet(DEV)
    dev["half"] = ["tune"] * 325 + ["test"] * (len(dev) - 325)
    ce = load_for_inference(args.model, device="cpu")
    max_length = int(ce.max_seq_length or 512)
    scorer = PairScorer(ce.tokenizer, ce.model, "cpu", max_length, 64, 2048, 1, args.max_query_tokens, args.overlap)
    window = max_length - scorer.backend.num_special_tokens_to_add(is_pair=True)
    tokens = lambda texts: [len(e.ids) for e in scorer.backend.encode_batch(list(texts), add_special_tokens=False)]  # noqa: E731
    query_tokens = np.array(tokens(dev["query"]))
    longest_positive = np.array([max(tokens(p)) for p in dev["positive"]])
    dev["long"] = longest_positive + np.minimum(query_tokens, args.max_query_tokens) > window
    print(f"model {args.model}: max_length {max_length}; {int(dev['long'].sum())} of {len(dev)} queries have a positive "
          f"longer than the window (query + positive > {window} tokens)")  # fmt: skip

    positives = [len(p) for p in dev["positive"]]
    runs: dict[str, list[np.ndarray]] = {}
    timing: dict[str, float] = {}
    for name, chunks in [("truncate", 1), *((f"chunk (at most {c})", c) for c in args.max_chunks)]:
        started = time.perf_counter()
        runs[name] = score_all(scorer, dev, chunks)
        timing[name] = time.perf_counter() - started

    if args.retriever != "none":
        retriever = SentenceTransformer(resolve_model_name(args.retriever), device="cpu")
        cosines = []
        for q, pos, neg in zip(dev["query"], dev["positive"], dev["negative"]):
            vectors = retriever.encode([q, *pos, *neg], normalize_embeddings=True, convert_to_numpy=True)
            cosines.append(vectors[1:] @ vectors[0])
        runs["zero-shot bi-encoder"] = cosines

    sets = {
        "long positive, tune half": (dev["long"] & (dev["half"] == "tune")).to_numpy(),
        "long positive, test half": (dev["long"] & (dev["half"] == "test")).to_numpy(),
        "long positive, all": dev["long"].to_numpy(),
        "all queries, tune half": (dev["half"] == "tune").to_numpy(),
        "all queries, test half": (dev["half"] == "test").to_numpy(),
        "all queries, all": np.ones(len(dev), dtype=bool),
    }
    names = list(runs)
    print("\n| queries | n | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for label, mask in sets.items():
        idx = np.flatnonzero(mask)
        cells = [f"{rerank_metrics([(runs[n][i], positives[i]) for i in idx])['ndcg@10']:.4f}" for n in names]
        print(f"| {label} | {len(idx)} | " + " | ".join(cells) + " |")
    print("(cells: NDCG@10; scoring time for all 650 queries: "
          + ", ".join(f"{n} {t:.0f} s" for n, t in timing.items()) + ")")  # fmt: skip


if __name__ == "__main__":
    main()
