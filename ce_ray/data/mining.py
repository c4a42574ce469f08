"""Step 4 of preparing rerank data: hard negatives for queries that have none.

:func:`needs_mining` decides from the loss (:data:`ce_ray.tasks.LOSSES`) and ``data.negatives.mine``;
:func:`mine_negatives` runs sentence-transformers' ``mine_hard_negatives`` with the
``data.negatives.model`` bi-encoder (:func:`load_encoder`: bf16 autocast where ``data.negatives.precision``
says so); :func:`with_eval_negatives` does the same for eval/test rows without negatives (as the notebook
does). Caching the result is :mod:`ce_ray.data.prepare`'s job.
"""

from __future__ import annotations

import logging
import time
import warnings

import numpy as np
import pyarrow as pa

from ce_ray import console
from ce_ray.config import NegativesConfig
from ce_ray.data.errors import DataError
from ce_ray.data.groups import RerankGroups
from ce_ray.tasks import LossSpec

__all__ = ["load_encoder", "mine_negatives", "needs_mining", "select_negatives", "with_eval_negatives"]

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
    groups: RerankGroups,
    cfg: NegativesConfig,
    device: str | None = None,
    corpus: list[str] | None = None,
    on_cluster: bool = False,
) -> RerankGroups:
    """Add hard negatives to positive-only groups with the ``cfg.model`` bi-encoder.

    Every (query, positive) pair is searched against all positives of the dataset (plus ``corpus``, e.g. the
    positives of other training sources); candidates that are the query's own positives are excluded. Queries
    for which too few candidates pass the filters keep only what was found.

    In this process (``on_cluster=False``) this is sentence-transformers' ``mine_hard_negatives``; with
    ``on_cluster=True`` it is :func:`ce_ray.data.on_cluster.mine_on_cluster`, the same search and filters
    (:func:`select_negatives`) as Ray Data work on an actor pool. ``sampling: random`` draws with ``cfg.seed``.
    """
    pairs_q, pairs_p = [], []
    for q, ds, labs in zip(groups.queries, groups.docs, groups.labels):
        for d, lab in zip(ds, labs):
            if lab > 0:
                pairs_q.append(q)
                pairs_p.append(d)
    if not pairs_q:
        raise DataError("data.train: no positive pairs to mine negatives for")
    pool = len(set(pairs_p) | set(corpus or ()))
    range_max = min(cfg.range_max, max(pool - 1, 1))
    if cfg.num > range_max - cfg.range_min:
        raise DataError(
            f"data.negatives.num: {cfg.num} negatives per query, but only {range_max - cfg.range_min} candidates "
            f"remain (range_max {range_max} of {pool} distinct positives, minus range_min {cfg.range_min}); "
            "lower data.negatives.num or range_min, or add rows"
        )
    if on_cluster:
        from ce_ray.data.on_cluster import mine_on_cluster

        by_query = mine_on_cluster(pairs_q, pairs_p, corpus, cfg, range_max)
    else:
        queries = len(set(pairs_q))
        console.say(f"prepare: mining hard negatives for {queries:,} queries among {pool:,} texts with {cfg.model}, in this process")
        started = time.monotonic()
        by_query = _mine_here(pairs_q, pairs_p, corpus, cfg, range_max, device)
        took = time.monotonic() - started
        console.say(f"prepare: mined in {took:,.0f}s ({(queries + pool) / max(took, 1e-9):,.0f} texts/s embedded and searched)")
    docs_out, labels_out = [], []
    for q, ds, labs in zip(groups.queries, groups.docs, groups.labels):
        merged_docs, merged_labels = list(ds), list(labs)
        for d in by_query.get(q, ()):
            if d not in merged_docs:
                merged_docs.append(d)
                merged_labels.append(0.0)
        docs_out.append(merged_docs)
        labels_out.append(merged_labels)
    found = sum(sum(1 for lab in labs if lab <= 0) for labs in labels_out)
    logger.info("mined %d hard negatives for %d queries with %s", found, len(groups.queries), cfg.model)
    return RerankGroups(list(groups.queries), docs_out, labels_out, groups.kind)


def load_encoder(cfg: NegativesConfig, device: str | None = None):
    """The ``cfg.model`` bi-encoder (a ``SentenceTransformer``) on ``device``, its forward pass under bf16 autocast
    where ``cfg.precision`` resolves to bf16: the embeddings still come out fp32, so the search over them is fp32."""
    import torch
    from sentence_transformers import SentenceTransformer

    from ce_ray.modeling import resolve_model_name
    from ce_ray.runtime import resolve_precision

    encoder = SentenceTransformer(resolve_model_name(cfg.model), device=device)
    kind = encoder.device.type
    if kind in ("cpu", "cuda") and resolve_precision(cfg.precision, use_gpu=kind == "cuda") == "bf16":
        encoder.forward = torch.autocast(kind, dtype=torch.bfloat16)(encoder.forward)  # what encode() calls
    return encoder


def _mine_here(
    pairs_q: list[str], pairs_p: list[str], corpus: list[str] | None, cfg: NegativesConfig, range_max: int,
    device: str | None,
) -> dict[str, list[str]]:  # fmt: skip
    """{query: its negatives, best first} from sentence-transformers' ``mine_hard_negatives`` in this process."""
    import random

    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    encoder = load_encoder(cfg, device)
    state = random.getstate()  # the library samples with the global `random`: seeded here, restored after
    random.seed(cfg.seed)
    try:
        mined = mine_hard_negatives(
            Dataset.from_dict({"query": pairs_q, "positive": pairs_p}),
            encoder,
            corpus=list(corpus) if corpus else None,
            range_min=cfg.range_min,
            range_max=range_max,
            max_score=cfg.max_score,
            relative_margin=cfg.relative_margin,
            num_negatives=cfg.num,
            sampling_strategy=cfg.sampling,
            batch_size=cfg.batch_size,
            output_format="labeled-list",
            verbose=False,
        )
    finally:
        random.setstate(state)
    by_query: dict[str, list[str]] = {}
    for row in mined:
        negatives = by_query.setdefault(row["query"], [])
        for d, lab in zip(row[mined.column_names[1]], row[mined.column_names[2]]):
            if lab <= 0 and d not in negatives:
                negatives.append(d)
    return by_query


def select_negatives(
    query_embeddings: np.ndarray,
    corpus_embeddings: np.ndarray,
    positive_ids: list[list[int]],
    cfg: NegativesConfig,
    range_max: int,
    max_positives: int,
    query_ids: list[int],
    block: int = 8192,
    device: str = "cpu",
) -> list[list[int]]:
    """The corpus ids of each query's hard negatives, best first: ``mine_hard_negatives``' exact search and filters.

    For each query (a row of ``query_embeddings``, normalised, as are the corpus rows): the top
    ``range_max + max_positives`` corpus rows by cosine similarity (:func:`_top_k`, block by block over the corpus,
    so memory stays ``len(queries) x block``); its own positives dropped; candidates above
    ``min(positive score) - |min(positive score)| * relative_margin`` or above ``max_score`` dropped; the top
    ``range_max`` kept and the first ``range_min`` skipped; then the top ``num`` (``sampling: top``) or ``num``
    drawn at random (``sampling: random``, seeded with ``(cfg.seed, query id)`` so the draw does not depend on
    how queries are sharded), best first. ``device``: where the similarities and the top-k run (``cuda`` on a GPU
    actor); the filters run on the CPU, for all queries at once.
    """
    import torch
    from sentence_transformers.util import pairwise_cos_sim

    with warnings.catch_warnings():  # a read-only array from Ray's object store; nothing here writes to it
        warnings.simplefilter("ignore", UserWarning)
        queries = torch.as_tensor(query_embeddings)
        corpus = torch.as_tensor(corpus_embeddings)
    want = range_max + max_positives
    scores, ids = _top_k(queries.to(device), corpus, min(want, len(corpus)), block, device)
    if want > scores.size(1):  # fewer corpus rows than candidates wanted: pad as the library does
        scores = torch.cat([scores, scores.new_full((len(scores), want - scores.size(1)), -float("inf"))], 1)
        ids = torch.cat([ids, ids.new_full((len(ids), want - ids.size(1)), -1)], 1)
    own = torch.full((len(positive_ids), max(map(len, positive_ids))), -1, dtype=ids.dtype)  # padded with -1
    for row, positives in enumerate(positive_ids):
        own[row, : len(positives)] = torch.as_tensor(positives, dtype=ids.dtype)
    scores[ids == -1] = -float("inf")
    scores[(ids.unsqueeze(2) == own.unsqueeze(1)).any(2)] = -float("inf")  # the query's own positives
    if cfg.relative_margin is not None:
        has = own >= 0
        positive_scores = torch.full(own.shape, float("inf"))
        positive_scores[has] = pairwise_cos_sim(queries.unsqueeze(1).expand(-1, own.size(1), -1)[has], corpus[own[has]])
        lowest = positive_scores.min(1, keepdim=True).values
        scores[scores > lowest - lowest.abs() * cfg.relative_margin] = -float("inf")
    if cfg.max_score is not None:
        scores[scores > cfg.max_score] = -float("inf")
    top_scores, local = torch.topk(scores, k=range_max, dim=1)
    top_ids = torch.gather(ids, 1, local)[:, cfg.range_min :].tolist()
    top_scores = top_scores[:, cfg.range_min :]
    usable = (~torch.isinf(top_scores)).tolist()
    if cfg.sampling == "top":
        return [[i for i, ok in zip(row_ids[: cfg.num], row_ok[: cfg.num]) if ok] for row_ids, row_ok in zip(top_ids, usable)]
    out = []
    for row, (row_ids, row_ok) in enumerate(zip(top_ids, usable)):
        rng = np.random.default_rng([cfg.seed, int(query_ids[row])])
        picked = sorted(rng.choice(max(sum(row_ok), cfg.num), size=cfg.num, replace=False).tolist())  # best first
        out.append([row_ids[i] for i in picked if row_ok[i]])
    return out


_CHUNK = 32  # corpus columns per chunk in _top_k's skip test


def _top_k(queries, corpus, k: int, block: int, device: str):
    """(scores, ids): each query's ``k`` most similar corpus rows by cosine similarity, best first; exact.

    The corpus is scored ``block`` rows at a time (memory ``len(queries) x block``). After the first block,
    each block's scores are cut into chunks of ``_CHUNK`` columns, and only the chunks whose best score reaches a
    query's k-th best so far are merged into its top k: any row that enters the top k is in such a chunk, so this
    is the full top-k, at a fraction of its cost once the k-th best is high (most chunks are skipped).
    """
    import torch
    from sentence_transformers.util import cos_sim

    best_scores = best_ids = None
    for start in range(0, len(corpus), block):
        scores = cos_sim(queries, corpus[start : start + block].to(device))
        width = scores.size(1)
        if best_scores is None or best_scores.size(1) < k or width % _CHUNK:  # no k-th best yet, or a ragged block
            ids = torch.arange(start, start + width, device=device).expand(len(queries), -1)
            if best_scores is not None:
                scores, ids = torch.cat([best_scores, scores], 1), torch.cat([best_ids, ids], 1)
            best_scores, order = torch.topk(scores, k=min(k, scores.size(1)), dim=1)
            best_ids = torch.gather(ids, 1, order)
            continue
        chunks = scores.view(len(queries), width // _CHUNK, _CHUNK)
        rows, cols = (chunks.amax(2) >= best_scores[:, -1:]).nonzero(as_tuple=True)  # sorted by row
        if len(rows) == 0:
            continue
        touched, which, count = torch.unique_consecutive(rows, return_inverse=True, return_counts=True)
        slot = torch.arange(len(rows), device=device) - (torch.cumsum(count, 0) - count)[which]
        shape = (len(touched), int(count.max()), _CHUNK)
        cand_scores = torch.full(shape, -float("inf"), device=device)
        cand_ids = torch.full(shape, -1, dtype=best_ids.dtype, device=device)
        cand_scores[which, slot] = chunks[rows, cols]
        cand_ids[which, slot] = (start + cols * _CHUNK).unsqueeze(1) + torch.arange(_CHUNK, device=device)
        merged = torch.cat([best_scores[touched], cand_scores.view(len(touched), -1)], 1)
        merged_ids = torch.cat([best_ids[touched], cand_ids.view(len(touched), -1)], 1)
        top, order = torch.topk(merged, k=best_scores.size(1), dim=1)
        best_scores[touched], best_ids[touched] = top, torch.gather(merged_ids, 1, order)
    return best_scores.cpu(), best_ids.cpu()


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
