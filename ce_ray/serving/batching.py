"""Token-budget batching: score many (first, second) text pairs in few, little-padded forward passes, at a bounded cost.

:class:`PairScorer` tokenizes every distinct text once (a rerank request's query once, not once per
document), cuts each pair to the model's max length by tokens (the first text to at most
``max_query_tokens`` when both are long; the second text gets the rest), joins them with the
tokenizer's own special tokens, sorts the pairs by token length, cuts them into forward passes of at
most ``max_pairs`` pairs and ``max_tokens`` padded tokens (each pass pads to its first, longest
pair), runs ``model(**features).logits`` under ``torch.inference_mode`` and puts the logits back in
order. The work of a pair is linear in its characters (a text is cut at ``MAX_CHARS_PER_TOKEN``
characters per token of budget before it is tokenized), never quadratic.

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

__all__ = ["MAX_CHARS_PER_TOKEN", "PairScorer", "Scored", "chunks", "score_isolated"]

logger = logging.getLogger(__name__)

MAX_CHARS_PER_TOKEN = 16
"""Characters kept per token of budget before tokenizing. WordPiece/BPE tokens of real text average
about 4 characters; a longer run still tokenizes (as more pieces or [UNK]), it is only cut earlier."""


def chunks(order: np.ndarray, lengths: np.ndarray, max_pairs: int, max_tokens: int) -> list[np.ndarray]:
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

    logits: np.ndarray  # [pairs, num_labels], float32
    lengths: np.ndarray  # tokens per pair, after truncation
    truncated: np.ndarray  # bool per pair: truncation cut it
    forward_passes: int
    mixed_forward_passes: int  # passes holding pairs of more than one owner
    over_budget: dict[int, int]  # owner -> its tokens, for owners over max_owner_tokens (their pairs not scored)


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

    def encode(self, firsts: Sequence[str], seconds: Sequence[str]) -> tuple[dict[str, list[list[int]]], np.ndarray, np.ndarray]:
        """Model inputs of each pair (``input_ids``...), tokens per pair, and whether truncation cut it."""
        texts = list(dict.fromkeys([*firsts, *seconds]))  # each distinct text once
        cut = self.budget * MAX_CHARS_PER_TOKEN
        ids = {t: e.ids for t, e in zip(texts, self.backend.encode_batch([t[:cut] for t in texts], add_special_tokens=False))}
        sizes = {t: len(i) + (len(t) > cut) for t, i in ids.items()}  # +1: a text cut by characters counts as longer
        columns: dict[str, list[list[int]]] = {name: [] for name in self.input_names}
        lengths = np.empty(len(firsts), dtype=np.int64)
        truncated = np.zeros(len(firsts), dtype=bool)
        for i, (a, b) in enumerate(zip(firsts, seconds)):
            na, nb = sizes[a], sizes[b]
            keep_a = min(na, max(self.max_query_tokens, self.budget - nb))
            keep_b = min(nb, self.budget - keep_a)
            truncated[i] = keep_a < na or keep_b < nb
            pair_ids, type_ids = self.template.join(ids[a][:keep_a], ids[b][:keep_b])
            lengths[i] = len(pair_ids)
            for name in self.input_names:
                columns[name].append(
                    pair_ids if name == "input_ids" else type_ids if name == "token_type_ids" else [1] * len(pair_ids)
                )
        return columns, lengths, truncated

    def score(
        self,
        firsts: Sequence[str],
        seconds: Sequence[str],
        owner: np.ndarray | None = None,
        max_owner_tokens: int | None = None,
    ) -> Scored:
        """Logits of each pair ``(firsts[i], seconds[i])``.

        ``owner[i]`` (e.g. the request of pair i) counts mixed passes; an owner whose pairs hold more than
        ``max_owner_tokens`` tokens is not scored (its logits stay NaN) and is reported in ``over_budget``.
        """
        import torch

        columns, lengths, truncated = self.encode(firsts, seconds)
        owner = np.zeros(len(firsts), dtype=int) if owner is None else owner
        over_budget: dict[int, int] = {}
        keep = np.ones(len(firsts), dtype=bool)
        if max_owner_tokens is not None and len(firsts):
            tokens = np.bincount(owner, weights=lengths).astype(np.int64)
            over_budget = {int(o): int(tokens[o]) for o in np.flatnonzero(tokens > max_owner_tokens)}
            keep = ~np.isin(owner, list(over_budget))
        kept = np.flatnonzero(keep)
        order = kept[np.argsort(-lengths[kept], kind="stable")]  # sorted by length, so each pass pads little

        logits = np.full((len(firsts), self.num_labels), np.nan, dtype=np.float32)
        passes = mixed = 0
        with torch.inference_mode():
            for idx in chunks(order, lengths, self.max_pairs, self.max_tokens):
                features = self.tokenizer.pad(
                    {name: [columns[name][i] for i in idx] for name in self.input_names},
                    return_tensors="pt",
                    pad_to_multiple_of=8 if self.device == "cuda" else None,
                )
                features = {k: v.to(self.device) for k, v in features.items()}
                logits[idx] = self.net(**features).logits.float().cpu().numpy()  # scores in fp32, whatever the model's dtype
                passes += 1
                mixed += int(len(np.unique(owner[idx])) > 1)
        return Scored(logits, lengths, truncated, passes, mixed, over_budget)


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
