"""Token-budget batching: score many (first, second) text pairs in few, little-padded forward passes, at a bounded cost.

:class:`PairScorer` tokenizes every distinct text once (a rerank request's query once, not once per
document), cuts each pair to the model's max length by tokens (the first text to at most
``max_query_tokens`` when both are long; the second text gets the rest), joins them with the
tokenizer's own special tokens, sorts the pairs by token length, cuts them into forward passes of at
most ``max_pairs`` pairs and ``max_tokens`` padded tokens (each pass pads to its first, longest
pair), runs ``model(**features).logits`` under ``torch.inference_mode`` and puts the logits back in
order. The work of a pair is linear in its characters (a text is cut at ``MAX_CHARS_PER_TOKEN``
characters per token of budget before it is tokenized), never quadratic.

Long documents (``chunks`` > 1 for a pair): a second text longer than its window is not cut but split
into windows of the tokens left after the query, each overlapping the one before by ``overlap`` tokens,
at most ``chunks`` of them; every window repeats the query and is a row of its own in the passes (so the
token budget, the length sort and ``max_owner_tokens`` count chunks), and the pair's logits are the
maximum over its windows (Cohere's rerank chunking). ``doc_tokens`` first cuts a pair's second text to
that many tokens (Cohere v2's ``max_tokens_per_doc``).

Sorting merged pairs by length and cutting by tokens is where batching pays on CPU: 20 QA documents
padded to the longest one waste over half the compute; length-sorted passes over many requests waste
little (bench/serve_load.py).

:func:`score_isolated` runs a batch and, when the merged batch fails, scores each request alone, so
one request that the tokenizer or model rejects fails only itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAX_CHARS_PER_TOKEN", "Encoded", "PairScorer", "Scored", "chunks_of", "score_isolated", "windows"]

logger = logging.getLogger(__name__)

MAX_CHARS_PER_TOKEN = 16
"""Characters kept per token of budget before tokenizing. WordPiece/BPE tokens of real text average
about 4 characters; a longer run still tokenizes (as more pieces or [UNK]), it is only cut earlier."""


def chunks_of(order: np.ndarray, lengths: np.ndarray, max_pairs: int, max_tokens: int) -> list[np.ndarray]:
    """Split pair indices, sorted longest first, into forward passes of at most ``max_pairs`` pairs and
    ``max_tokens`` padded tokens (each pass pads to its first, longest pair)."""
    out, start = [], 0
    while start < len(order):
        size = max(1, min(max_pairs, max_tokens // int(lengths[order[start]])))
        out.append(order[start : start + size])
        start += size
    return out


@dataclass
class Scored:
    """The model's output for a list of pairs, in their order."""

    logits: np.ndarray  # [pairs, num_labels], float32 (a chunked pair: the maximum over its chunks)
    lengths: np.ndarray  # tokens per pair, after truncation (a chunked pair: its chunks' tokens together)
    truncated: np.ndarray  # bool per pair: truncation cut it (a chunked pair: its chunks left some of it out)
    forward_passes: int
    mixed_forward_passes: int  # passes holding pairs of more than one owner
    over_budget: dict[int, int]  # owner -> its tokens, for owners over max_owner_tokens (their pairs not scored)
    chunks: np.ndarray | None = None  # rows (windows) scored per pair; None when nothing was chunked


@dataclass
class Encoded:
    """Model inputs of the rows that pairs become: one row per pair, or per window of a chunked pair."""

    columns: dict[str, list[list[int]]]  # input_ids, attention_mask, token_type_ids: one list per row
    lengths: np.ndarray  # tokens per row
    pair: np.ndarray  # the pair each row belongs to (rows of one pair are adjacent)
    truncated: np.ndarray  # bool per pair: some of it was left out


def windows(size: int, window: int, overlap: int, most: int) -> list[tuple[int, int]]:
    """``(start, end)`` token spans covering ``size`` tokens with windows of ``window`` tokens, each starting
    ``window - overlap`` after the one before, at most ``most`` of them (``[(0, min(size, window))]`` when it fits)."""
    stride = max(1, window - overlap)
    spans = [(0, min(size, window))]
    while spans[-1][1] < size and len(spans) < most:
        start = spans[-1][0] + stride
        spans.append((start, min(size, start + window)))
    return spans


class PairScorer:
    """A fast tokenizer and a sequence-classification network, scoring pairs under a token budget per pass."""

    def __init__(
        self,
        tokenizer,
        net,
        device: str,
        max_length: int,
        max_pairs: int,
        max_tokens: int,
        num_labels: int,
        max_query_tokens: int = 64,
        overlap: int = 0,
    ):
        from tokenizers import Tokenizer

        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError("ce-ray serves models with a fast (Rust) tokenizer; this one has none")
        # A copy without the tokenizer's own truncation/padding: pairs are cut and padded here.
        self.backend = Tokenizer.from_str(backend.to_str())
        self.backend.no_truncation()
        self.backend.no_padding()
        self.template = _PairTemplate(self.backend)
        self.tokenizer, self.net, self.device = tokenizer, net, device
        wanted = ("input_ids", "attention_mask", "token_type_ids")
        self.input_names = [n for n in tokenizer.model_input_names if n in wanted]
        self.budget = max_length - self.backend.num_special_tokens_to_add(is_pair=True)  # text tokens per pair
        self.max_query_tokens = min(max_query_tokens, self.budget - 1)
        self.max_pairs, self.max_tokens, self.num_labels = max_pairs, max_tokens, num_labels
        self.overlap = overlap  # tokens a chunk shares with the one before it

    def encode(
        self,
        firsts: Sequence[str],
        seconds: Sequence[str],
        chunks: np.ndarray | None = None,
        doc_tokens: np.ndarray | None = None,
    ) -> Encoded:
        """The rows of each pair: one, or (``chunks[i]`` > 1) one per window of a long second text.

        ``doc_tokens[i]`` (> 0) cuts pair i's second text to that many tokens first.
        """
        n = len(firsts)
        chunks = np.ones(n, dtype=np.int64) if chunks is None else np.asarray(chunks, dtype=np.int64)
        texts = list(dict.fromkeys([*firsts, *seconds]))  # each distinct text once
        cut = self.budget * max(1, int(chunks.max(initial=1))) * MAX_CHARS_PER_TOKEN
        ids = {t: e.ids for t, e in zip(texts, self.backend.encode_batch([t[:cut] for t in texts], add_special_tokens=False))}
        sizes = {t: len(i) + (len(t) > cut) for t, i in ids.items()}  # +1: a text cut by characters counts as longer
        columns: dict[str, list[list[int]]] = {name: [] for name in self.input_names}
        lengths: list[int] = []
        pair: list[int] = []
        truncated = np.zeros(n, dtype=bool)
        for i, (a, b) in enumerate(zip(firsts, seconds)):
            na, nb = sizes[a], sizes[b]
            cap = nb if doc_tokens is None or doc_tokens[i] <= 0 else min(nb, int(doc_tokens[i]))
            keep_a = min(na, max(self.max_query_tokens, self.budget - cap))
            window = self.budget - keep_a
            spans = windows(cap, window, self.overlap, int(chunks[i])) if chunks[i] > 1 else [(0, min(cap, window))]
            truncated[i] = keep_a < na or spans[-1][1] < nb
            for lo, hi in spans:
                pair_ids, type_ids = self.template.join(ids[a][:keep_a], ids[b][lo:hi])
                lengths.append(len(pair_ids))
                pair.append(i)
                for name in self.input_names:
                    columns[name].append(
                        pair_ids if name == "input_ids" else type_ids if name == "token_type_ids" else [1] * len(pair_ids)
                    )
        return Encoded(columns, np.asarray(lengths, dtype=np.int64), np.asarray(pair, dtype=np.int64), truncated)

    def score(
        self,
        firsts: Sequence[str],
        seconds: Sequence[str],
        owner: np.ndarray | None = None,
        max_owner_tokens: int | None = None,
        chunks: np.ndarray | None = None,
        doc_tokens: np.ndarray | None = None,
    ) -> Scored:
        """Logits of each pair ``(firsts[i], seconds[i])``; with ``chunks``/``doc_tokens`` as :meth:`encode`.

        ``owner[i]`` (e.g. the request of pair i) counts mixed passes; an owner whose rows hold more than
        ``max_owner_tokens`` tokens (every chunk counts) is not scored (its logits stay NaN) and is reported in
        ``over_budget``.
        """
        import torch

        enc = self.encode(firsts, seconds, chunks, doc_tokens)
        columns, lengths = enc.columns, enc.lengths
        owner = np.zeros(len(firsts), dtype=int) if owner is None else np.asarray(owner)
        row_owner = owner[enc.pair] if len(firsts) else owner
        over_budget: dict[int, int] = {}
        keep = np.ones(len(lengths), dtype=bool)
        if max_owner_tokens is not None and len(firsts):
            tokens = np.bincount(row_owner, weights=lengths).astype(np.int64)
            over_budget = {int(o): int(tokens[o]) for o in np.flatnonzero(tokens > max_owner_tokens)}
            keep = ~np.isin(row_owner, list(over_budget))
        kept = np.flatnonzero(keep)
        order = kept[np.argsort(-lengths[kept], kind="stable")]  # sorted by length, so each pass pads little

        rows = np.full((len(lengths), self.num_labels), np.nan, dtype=np.float32)
        passes = mixed = 0
        with torch.inference_mode():
            for idx in chunks_of(order, lengths, self.max_pairs, self.max_tokens):
                features = self.tokenizer.pad(
                    {name: [columns[name][i] for i in idx] for name in self.input_names},
                    return_tensors="pt",
                    pad_to_multiple_of=8 if self.device == "cuda" else None,
                )
                features = {k: v.to(self.device) for k, v in features.items()}
                rows[idx] = self.net(**features).logits.float().cpu().numpy()  # scores in fp32, whatever the model's dtype
                passes += 1
                mixed += int(len(np.unique(row_owner[idx])) > 1)
        per_pair = np.bincount(enc.pair, minlength=len(firsts))
        if len(lengths) == len(firsts):  # nothing was chunked: rows are pairs
            return Scored(rows, lengths, enc.truncated, passes, mixed, over_budget)
        # a chunked pair scores as its best window (rows of a pair are adjacent); NaN stays NaN (over budget)
        starts = np.concatenate([[0], np.cumsum(per_pair)[:-1]])
        logits = np.maximum.reduceat(rows, starts, axis=0) if len(rows) else rows
        pair_lengths = np.bincount(enc.pair, weights=lengths, minlength=len(firsts)).astype(np.int64)
        return Scored(logits, pair_lengths, enc.truncated, passes, mixed, over_budget, per_pair)


class _PairTemplate:
    """Where a tokenizer puts its special tokens around a pair (``[CLS] A [SEP] B [SEP]``, ``<s> A </s></s> B </s>``...).

    Read once from the tokenizer's own post-processor on a two-token sample, then applied to token ids
    directly: joining a pair costs list concatenation, not a post-processing pass.
    """

    def __init__(self, backend):
        a, b = backend.encode("a", add_special_tokens=False), backend.encode("b", add_special_tokens=False)
        a.truncate(1)
        b.truncate(1)
        pair = backend.post_processor.process(a, b, add_special_tokens=True) if backend.post_processor else None
        # [(special id | "A" | "B", type id)]; without a post-processor the texts are simply concatenated
        self.parts = [("A", 0), ("B", 0)]
        if pair is not None:  # the sample's two text tokens are its non-special ones, A then B
            texts = iter("AB")
            self.parts = [
                (next(texts) if not special else pid, tid)
                for pid, special, tid in zip(pair.ids, pair.special_tokens_mask, pair.type_ids)
            ]

    def join(self, a: list[int], b: list[int]) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        types: list[int] = []
        for part, type_id in self.parts:
            text = a if part == "A" else b if part == "B" else None
            if text is None:
                ids.append(part)
                types.append(type_id)
            else:
                ids.extend(text)
                types.extend([type_id] * len(text))
        return ids, types


def score_isolated(score: Callable[[list[Any]], list[Any]], jobs: list[Any]) -> list[Any]:
    """``score(jobs)``; when the merged batch raises, each job is scored alone and a failing one gets its exception.

    The result has one entry per job: its result, or the exception (for the caller to raise) of a job that
    fails alone. So a request the tokenizer or the model rejects fails only itself.
    """
    try:
        return score(jobs)
    except Exception as exc:
        if len(jobs) == 1:
            logger.exception("scoring a request failed")
            return [exc]
        logger.warning("a batch of %d requests failed; scoring each alone", len(jobs))
    out: list[Any] = []
    for job in jobs:
        try:
            out.extend(score([job]))
        except Exception as exc:
            logger.exception("scoring a request failed")
            out.append(exc)
    return out
