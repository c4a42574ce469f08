"""Step 2 of preparing data: check rows for the task and split, and bring them to canonical columns.

Problems are reported with row numbers (0-based, after ``select``); with ``data.drop_invalid: true``
bad rows are dropped and counted instead.

Row formats (after the column mapping):

=====================  ==========================================================================
nli, every split       ``premise``, ``hypothesis``, ``label`` (0..num_labels-1, or a name from
                       ``model.labels``)
rerank, train          ``query``, ``positive`` [, ``negative`` (text or list) | ``negative_1``..]
                       or ``query``, ``passage``, ``label`` (relevance, >= 0) | ``score`` (teacher
                       score, any float)
rerank, eval / test    ``query``, ``positive`` (list or text), ``negative`` (list or text)
=====================  ==========================================================================
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ce_ray.config import JobConfig
from ce_ray.data.errors import DataError

__all__ = ["CheckedRows", "check_rows"]

logger = logging.getLogger(__name__)

MAX_LISTED_ROWS = 10


@dataclass
class CheckedRows:
    """Validated rows of one split in the task's canonical columns, plus what was dropped."""

    table: pa.Table
    layout: str  # nli | pairs | labeled | scored | eval
    dropped: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return self.table.num_rows


def _text_problem(value: Any) -> str | None:
    if value is None:
        return "missing"
    if not isinstance(value, str):
        return f"not text ({type(value).__name__})"
    if not value.strip():
        return "empty"
    return None


def _text_list(value: Any) -> tuple[list[str] | None, str | None]:
    """A text or list of texts as a list; or the reason it is not one."""
    if value is None:
        return [], None
    if isinstance(value, str):
        return ([value], None) if value.strip() else (None, "empty text")
    if isinstance(value, (list, tuple)):
        bad = [i for i, v in enumerate(value) if _text_problem(v)]
        if bad:
            return None, f"item {bad[0]} is {_text_problem(value[bad[0]])}"
        return list(value), None
    return None, f"not text or a list of texts ({type(value).__name__})"


def _layout(task: str, split: str, columns: list[str], key: str) -> str:
    cols = set(columns)
    if task == "nli":
        need = ["premise", "hypothesis", "label"]
        if not set(need) <= cols:
            raise DataError(
                f"{key}: nli rows need columns {need}; found {columns}. "
                f"Map yours with {key}.columns, e.g. {{premise: sentence1, hypothesis: sentence2}}"
            )
        return "nli"
    if split != "train":
        need = ["query", "positive"]
        if not set(need) <= cols:
            raise DataError(
                f"{key}: rerank {split} rows need columns query, positive[, negative] (positive/negative: text or "
                f"list of texts; without negatives they are mined); found {columns}. Map yours with {key}.columns"
            )
        return "eval"
    if {"query", "passage"} <= cols and ({"label", "score"} & cols):
        return "scored" if "score" in cols else "labeled"
    if {"query", "positive"} <= cols:
        return "pairs"
    raise DataError(
        f"{key}: rerank training rows need (query, positive[, negative...]) or (query, passage, label|score); "
        f"found {columns}. Map yours with {key}.columns, e.g. {{query: question, positive: answer}}"
    )


def check_rows(
    table: pa.Table,
    job: JobConfig,
    split: str,
    key: str,
) -> CheckedRows:
    """Validate rows of one split and bring them to canonical columns.

    Args:
        table: rows as read by :func:`read_source`.
        job: the job (task, labels, ``data.drop_invalid``).
        split: ``train``, ``eval`` or ``test``.
        key: config key for messages (``data.train``).

    Returns:
        :class:`CheckedRows` with canonical columns: nli → premise, hypothesis, label (int64);
        rerank train → query, positive, negatives (list) for ``pairs``, or query, passage, label
        (float) for ``labeled``/``scored``; rerank eval → query, positive (list), negative (list).

    Raises:
        DataError: missing columns, or invalid rows while ``data.drop_invalid`` is false.
    """
    layout = _layout(job.task, split, table.column_names, key)
    rows = table.to_pylist()
    problems: dict[int, str] = {}
    out: dict[str, list] = defaultdict(list)

    def bad(i: int, why: str) -> None:
        problems.setdefault(i, why)

    label_names = {name: i for i, name in enumerate(job.model.labels or [])}
    neg_cols = sorted(
        (c for c in table.column_names if re.fullmatch(r"negative_\d+", c)), key=lambda c: int(c.split("_")[1])
    )
    for i, row in enumerate(rows):
        if layout == "nli":
            why = next((f"{c} is {p}" for c in ("premise", "hypothesis") if (p := _text_problem(row[c]))), None)
            label = row["label"]
            if isinstance(label, str) and label in label_names:
                label = label_names[label]
            if why is None and (isinstance(label, bool) or not isinstance(label, int) and not (isinstance(label, float) and label.is_integer())):
                why = f"label {label!r} is not a class id" + (f" or one of {list(label_names)}" if label_names else "")
            elif why is None and not 0 <= int(label) < job.num_labels:
                why = f"label {label} not in 0..{job.num_labels - 1} (model.num_labels={job.num_labels})"
            if why:
                bad(i, why)
                continue
            out["premise"].append(row["premise"])
            out["hypothesis"].append(row["hypothesis"])
            out["label"].append(int(label))
        elif layout == "pairs":
            why = next((f"{c} is {p}" for c in ("query", "positive") if (p := _text_problem(row[c]))), None)
            negatives: list[str] = []
            if why is None and "negative" in row:
                negatives, why = _text_list(row["negative"])
                why = why and f"negative: {why}"
            for c in neg_cols:
                if why is None:
                    p = _text_problem(row[c])
                    why = p and f"{c} is {p}"
                    negatives = (negatives or []) + [row[c]]
            if why:
                bad(i, why)
                continue
            out["query"].append(row["query"])
            out["positive"].append(row["positive"])
            out["negatives"].append(negatives)
        elif layout in ("labeled", "scored"):
            column = "score" if layout == "scored" else "label"
            why = next((f"{c} is {p}" for c in ("query", "passage") if (p := _text_problem(row[c]))), None)
            value = row[column]
            if why is None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value):
                why = f"{column} {value!r} is not a number"
            elif why is None and layout == "labeled" and value < 0:
                why = f"label {value} is negative (relevance labels are 0 for irrelevant, > 0 for relevant)"
            if why:
                bad(i, why)
                continue
            out["query"].append(row["query"])
            out["passage"].append(row["passage"])
            out["label"].append(float(value))
        else:  # rerank eval
            why = _text_problem(row["query"])
            why = why and f"query is {why}"
            positives, negatives = [], []
            if why is None:
                positives, p = _text_list(row["positive"])
                why = p and f"positive: {p}"
            if why is None and not positives:
                why = "no positive (a query needs at least one relevant text)"
            if why is None:
                negatives, p = _text_list(row.get("negative"))
                why = p and f"negative: {p}"
            if why:
                bad(i, why)
                continue
            out["query"].append(row["query"])
            out["positive"].append(positives)
            out["negative"].append(negatives)

    listed = [f"row {i}: {why}" for i, why in sorted(problems.items())]
    if problems and not job.data.drop_invalid:
        more = f" (and {len(listed) - MAX_LISTED_ROWS} more)" if len(listed) > MAX_LISTED_ROWS else ""
        raise DataError(
            f"{key}: {len(problems)} invalid row(s) of {len(rows)} in {getattr(job.data, split).describe()}: "
            + "; ".join(listed[:MAX_LISTED_ROWS])
            + more
            + ". Fix them, or set data.drop_invalid: true to drop them."
        )
    if problems:
        logger.warning("%s: dropped %d invalid row(s) of %d: %s", key, len(problems), len(rows), "; ".join(listed[:MAX_LISTED_ROWS]))
    if not out:
        raise DataError(f"{key}: no valid rows in {getattr(job.data, split).describe()}")
    schema = {
        "nli": pa.schema([("premise", pa.string()), ("hypothesis", pa.string()), ("label", pa.int64())]),
        "pairs": pa.schema([("query", pa.string()), ("positive", pa.string()), ("negatives", pa.list_(pa.string()))]),
        "labeled": pa.schema([("query", pa.string()), ("passage", pa.string()), ("label", pa.float64())]),
        "eval": pa.schema([("query", pa.string()), ("positive", pa.list_(pa.string())), ("negative", pa.list_(pa.string()))]),
    }
    schema["scored"] = schema["labeled"]
    return CheckedRows(pa.table(dict(out), schema=schema[layout]), layout, len(problems), listed)
