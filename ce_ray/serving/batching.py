"""Token-budget batching: score many (first, second) text pairs in few, little-padded forward passes.

:class:`PairScorer` tokenizes every pair once, unpadded, sorts the pairs by token length, cuts them
into forward passes of at most ``max_pairs`` pairs and ``max_tokens`` padded tokens (each pass pads
to its first, longest pair), runs ``model(**features).logits`` under ``torch.inference_mode`` and
puts the logits back in request order. Sorting merged pairs by length and cutting by tokens is
where batching pays on CPU: 20 QA documents padded to the longest one waste over half the compute;
length-sorted passes over many requests waste little (bench/serve_load.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PairScorer", "Scored", "chunks"]


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
    lengths: np.ndarray  # tokens per pair
    truncated: np.ndarray  # bool per pair: truncation cut it
    forward_passes: int
    mixed_forward_passes: int  # passes holding pairs of more than one owner


class PairScorer:
    """A tokenizer and a sequence-classification network, scoring pairs under a token budget per pass."""

    def __init__(self, tokenizer, net, device: str, max_length: int, max_pairs: int, max_tokens: int, num_labels: int):
        wanted = ("input_ids", "attention_mask", "token_type_ids")
        self.tokenizer, self.net, self.device = tokenizer, net, device
        self.input_names = [n for n in tokenizer.model_input_names if n in wanted]
        self.max_length, self.max_pairs, self.max_tokens, self.num_labels = max_length, max_pairs, max_tokens, num_labels

    def score(self, firsts: list[str], seconds: list[str], owner: np.ndarray | None = None) -> Scored:
        """Logits of each pair ``(firsts[i], seconds[i])``; ``owner[i]`` (e.g. the request) counts mixed passes."""
        import torch

        # Tokenize every pair once, unpadded; sort by length so each chunk pads little.
        enc = self.tokenizer(firsts, seconds, truncation="longest_first", max_length=self.max_length)
        lengths = np.array([len(ids) for ids in enc["input_ids"]])
        if enc.encodings is not None:  # fast tokenizers keep what truncation cut off
            truncated = np.array([bool(e.overflowing) for e in enc.encodings])
        else:  # slow tokenizers: a pair at the limit counts as truncated
            truncated = lengths >= self.max_length
        order = np.argsort(-lengths, kind="stable")
        owner = np.zeros(len(firsts), dtype=int) if owner is None else owner

        logits = np.empty((len(firsts), self.num_labels), dtype=np.float32)
        passes = mixed = 0
        with torch.inference_mode():
            for idx in chunks(order, lengths, self.max_pairs, self.max_tokens):
                features = self.tokenizer.pad(
                    {name: [enc[name][i] for i in idx] for name in self.input_names},
                    return_tensors="pt",
                    pad_to_multiple_of=8 if self.device == "cuda" else None,
                )
                features = {k: v.to(self.device) for k, v in features.items()}
                logits[idx] = self.net(**features).logits.float().cpu().numpy()
                passes += 1
                mixed += int(len(np.unique(owner[idx])) > 1)
        return Scored(logits, lengths, truncated, passes, mixed)
