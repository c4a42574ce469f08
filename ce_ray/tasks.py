"""The two tasks ce-ray trains: what they evaluate and which metric Tune optimises.

=========  ============  ====================================  ==========================  ======
task       num_labels    evaluator (sentence-transformers)     metrics                     tune
=========  ============  ====================================  ==========================  ======
nli        3             CrossEncoderClassificationEvaluator   accuracy, f1_macro, ...     accuracy (max)
rerank     1             CrossEncoderRerankingEvaluator        map, mrr@10, ndcg@10        ndcg@10 (max)
=========  ============  ====================================  ==========================  ======

Metric names come back unprefixed from :meth:`Task.evaluate`; inside training the trainer prefixes
them with ``eval_`` (``eval_accuracy``), which is also the name Tune sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from sentence_transformers.cross_encoder.evaluation import (
    CrossEncoderClassificationEvaluator,
    CrossEncoderRerankingEvaluator,
)

if TYPE_CHECKING:
    from sentence_transformers.cross_encoder import CrossEncoder

__all__ = ["NLI", "RERANK", "TASKS", "NLIEvaluator", "Task"]


class NLIEvaluator(CrossEncoderClassificationEvaluator):
    """The library's classification evaluator plus ``accuracy``, which it leaves out for >2 classes.

    Returns ``accuracy``, ``f1_macro``, ``f1_micro``, ``f1_weighted``; ``primary_metric`` is accuracy.
    """

    def __call__(self, model: CrossEncoder, output_path: str | None = None, epoch: int = -1, steps: int = -1) -> dict[str, float]:
        metrics = super().__call__(model, output_path=output_path, epoch=epoch, steps=steps)
        prefix = f"{self.name}_" if self.name else ""
        # For single-label multi-class data, micro F1 is exactly accuracy.
        metrics = {f"{prefix}accuracy": metrics[f"{prefix}f1_micro"], **metrics}
        self.primary_metric = f"{prefix}accuracy"
        return metrics


@dataclass(frozen=True)
class Task:
    """What differs between tasks; losses and data formats live in :mod:`ce_ray.losses`/:mod:`ce_ray.data`."""

    name: str
    num_labels: int
    default_loss: str
    primary_metric: str
    mode: str = "max"

    def evaluator(self, table: pa.Table, batch_size: int = 64, name: str = "") -> Any:
        """The sentence-transformers evaluator for checked eval/test rows (``CheckedRows.table``)."""
        cols = table.to_pydict()
        if self.name == "nli":
            return NLIEvaluator(
                list(zip(cols["premise"], cols["hypothesis"])),
                cols["label"],
                name=name,
                batch_size=batch_size,
                write_csv=False,
            )
        samples = [
            {"query": q, "positive": list(p), "negative": list(n)}
            for q, p, n in zip(cols["query"], cols["positive"], cols["negative"])
        ]
        return CrossEncoderRerankingEvaluator(samples, at_k=10, name=name, batch_size=batch_size, write_csv=False)

    def evaluate(self, model: CrossEncoder, table: pa.Table, batch_size: int = 64) -> dict[str, float]:
        """Score ``model`` on checked rows; plain metric names (``accuracy``, ``ndcg@10``...)."""
        metrics = self.evaluator(table, batch_size)(model)
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating))}

    @property
    def tune_metric(self) -> str:
        """The metric as reported during training (``eval_`` prefix)."""
        return f"eval_{self.primary_metric}"


NLI = Task("nli", num_labels=3, default_loss="CrossEntropyLoss", primary_metric="accuracy")
RERANK = Task("rerank", num_labels=1, default_loss="BinaryCrossEntropyLoss", primary_metric="ndcg@10")
TASKS: dict[str, Task] = {"nli": NLI, "rerank": RERANK}
