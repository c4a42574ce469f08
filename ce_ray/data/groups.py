"""Step 3 of preparing rerank training data: group checked rows by query.

Every rerank loss is shaped from the same groups (``docs[i]`` with relevance ``labels[i]``), and mining
adds negatives to them, so rows are grouped once, whatever the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from ce_ray.data.check import CheckedRows

__all__ = ["RerankGroups", "rerank_groups"]


@dataclass
class RerankGroups:
    """Rerank training rows grouped by query: ``docs[i]`` with relevance ``labels[i]``.

    ``kind`` tells what the labels are: ``binary`` (1 relevant / 0 not, from pairs or 0/1 labels),
    ``graded`` (relevance levels) or ``scores`` (teacher scores, for MSE / MarginMSE).
    """

    queries: list[str]
    docs: list[list[str]]
    labels: list[list[float]]
    kind: str

    @property
    def has_negatives(self) -> bool:
        if self.kind == "scores":
            return any(len(d) > 1 for d in self.docs)
        return any(min(lab) <= 0 for lab in self.labels)

    def num_pairs(self) -> int:
        return sum(len(d) for d in self.docs)


def rerank_groups(rows: CheckedRows) -> RerankGroups:
    """Group checked rerank training rows by query (order of first appearance is kept)."""
    order: dict[str, int] = {}
    docs: list[list[str]] = []
    labels: list[list[float]] = []
    seen: list[set[str]] = []

    def add(query: str, doc: str, label: float) -> None:
        j = order.setdefault(query, len(order))
        if j == len(docs):
            docs.append([])
            labels.append([])
            seen.append(set())
        if doc in seen[j]:
            return
        seen[j].add(doc)
        docs[j].append(doc)
        labels[j].append(label)

    cols = rows.table.to_pydict()
    if rows.layout == "pairs":
        for q, p, negs in zip(cols["query"], cols["positive"], cols["negatives"]):
            add(q, p, 1.0)
            for n in negs:
                add(q, n, 0.0)
        kind = "binary"
    else:
        for q, p, label in zip(cols["query"], cols["passage"], cols["label"]):
            add(q, p, label)
        values = set(cols["label"])
        kind = "scores" if rows.layout == "scored" else ("binary" if values <= {0.0, 1.0} else "graded")
    # A document that is a positive for the query must not stay in its negatives.
    for j in range(len(docs)):
        positive = {d for d, lab in zip(docs[j], labels[j]) if lab > 0}
        keep = [k for k, (d, lab) in enumerate(zip(docs[j], labels[j])) if lab > 0 or d not in positive]
        docs[j] = [docs[j][k] for k in keep]
        labels[j] = [labels[j][k] for k in keep]
    return RerankGroups(list(order), docs, labels, kind)
