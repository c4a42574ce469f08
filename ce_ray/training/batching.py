"""Batch samplers for training: batches of similar length, so little compute goes to padding.

A batch is padded to its longest pair. Random batches of NLI pairs (8 to 80 tokens) are mostly
padding; :class:`LengthGroupedBatchSampler` shuffles the rows, cuts them into mega-batches of
``MEGA`` batches, sorts each mega-batch by length, cuts it into batches and shuffles the batch order
(the recipe of HF's ``group_by_length``). Every row is still seen once per epoch in a random
context; only which rows share a batch changes. Under DDP, Accelerate deals whole batches to the
ranks, so sharding is unchanged.
"""

from __future__ import annotations

import math

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler

__all__ = ["LengthGroupedBatchSampler", "text_lengths"]

MEGA = 50  # batches per sorted mega-batch


def text_lengths(dataset, exclude: list[str] | None = None) -> list[int]:
    """Characters of input text per row (all text and list-of-text columns, label columns excluded)."""
    exclude = set(exclude or ()) | {"label", "labels", "score", "scores"}
    columns = [c for c in dataset.column_names if c not in exclude]
    lengths = [0] * len(dataset)
    for column in columns:
        for i, value in enumerate(dataset[column]):
            if isinstance(value, str):
                lengths[i] += len(value)
            elif isinstance(value, list):
                lengths[i] += sum(len(v) for v in value if isinstance(v, str))
    return lengths


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """Random batches of rows of similar length (see module docstring); reshuffled every epoch."""

    def __init__(self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None, seed: int = 0):
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        self.lengths = text_lengths(dataset, valid_label_columns)

    def _batches(self) -> list[list[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size, batches = self.batch_size, []
        for start in range(0, len(order), size * MEGA):
            chunk = sorted(order[start : start + size * MEGA], key=self.lengths.__getitem__, reverse=True)
            for i in range(0, len(chunk), size):
                batch = chunk[i : i + size]
                if len(batch) == size or not self.drop_last:
                    batches.append(batch)
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffle]

    def __iter__(self):
        yield from self._batches()

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size * MEGA)
        per_mega = MEGA
        last = rest // self.batch_size if self.drop_last else math.ceil(rest / self.batch_size)
        return full * per_mega + last
