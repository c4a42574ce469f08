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

Checks are vectorised (``pyarrow.compute``, numpy), so millions of rows check in seconds: each column
marks the rows that may be bad (a superset: nulls, text without a letter, digit, mark, punctuation or
symbol, labels out of range...), and only those rows go through the per-value rules below in Python,
which decide the row's first problem and its message. A column of an unusual Arrow type (not text, a
list of texts or a number where one is expected) marks every row, so it is checked value by value.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ce_ray.config import JobConfig
from ce_ray.data.errors import DataError

__all__ = ["CheckedRows", "check_rows"]

logger = logging.getLogger(__name__)

MAX_LISTED_ROWS = 10

# A letter, mark, number, punctuation or symbol. None of them is whitespace for str.strip (str.isspace:
# category Zs or bidi class WS/B/S, all of them Z* or C* characters), so text holding one is not blank;
# text without one (null, "", "\u00a0", "\u200b"...) is left to str.strip.
_SOLID = r"[\pL\pM\pN\pP\pS]"
_TEXTS = pa.list_(pa.string())
_SCHEMAS = {
    "nli": pa.schema([("premise", pa.string()), ("hypothesis", pa.string()), ("label", pa.int64())]),
    "pairs": pa.schema([("query", pa.string()), ("positive", pa.string()), ("negatives", _TEXTS)]),
    "labeled": pa.schema([("query", pa.string()), ("passage", pa.string()), ("label", pa.float64())]),
    "scored": pa.schema([("query", pa.string()), ("passage", pa.string()), ("label", pa.float64())]),
    "eval": pa.schema([("query", pa.string()), ("positive", _TEXTS), ("negative", _TEXTS)]),
}
_TEXT_COLUMNS = {
    "nli": ("premise", "hypothesis"),
    "pairs": ("query", "positive"),
    "labeled": ("query", "passage"),
    "scored": ("query", "passage"),
    "eval": ("query",),
}


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


# --- The rules, value by value (Python). They decide every problem and its message, for the rows the
# --- vectorised checks below mark as suspect.


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


def _label_problem(label: Any, label_names: dict[str, int], num_labels: int) -> str | None:
    if isinstance(label, str) and label in label_names:
        label = label_names[label]
    if isinstance(label, bool) or not isinstance(label, int) and not (isinstance(label, float) and label.is_integer()):
        return f"label {label!r} is not a class id" + (f" or one of {list(label_names)}" if label_names else "")
    if not 0 <= int(label) < num_labels:
        return f"label {label} not in 0..{num_labels - 1} (model.num_labels={num_labels})"
    return None


def _number_problem(value: Any, column: str, labeled: bool) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return f"{column} {value!r} is not a number"
    if labeled and value < 0:
        return f"label {value} is negative (relevance labels are 0 for irrelevant, > 0 for relevant)"
    return None


def _row_problem(layout: str, row: dict[str, Any], label_names: dict[str, int], num_labels: int, neg_cols: list[str]) -> str | None:
    """The first problem of one row (its columns as Python values), in the order the checks run."""
    why = next((f"{c} is {p}" for c in _TEXT_COLUMNS[layout] if (p := _text_problem(row[c]))), None)
    if why:
        return why
    if layout == "nli":
        return _label_problem(row["label"], label_names, num_labels)
    if layout == "pairs":
        if "negative" in row and (p := _text_list(row["negative"])[1]):
            return f"negative: {p}"
        return next((f"{c} is {p}" for c in neg_cols if (p := _text_problem(row[c]))), None)
    if layout in ("labeled", "scored"):
        column = "score" if layout == "scored" else "label"
        return _number_problem(row[column], column, layout == "labeled")
    positives, p = _text_list(row["positive"])  # rerank eval
    if p:
        return f"positive: {p}"
    if not positives:
        return "no positive (a query needs at least one relevant text)"
    p = _text_list(row.get("negative"))[1]
    return p and f"negative: {p}"


# --- Vectorised checks: each column marks the rows that may break a rule (never fewer than do) and
# --- builds its canonical column for the rows that are kept.


def _column(table: pa.Table, name: str) -> pa.ChunkedArray:
    """Column ``name``; the last one where names repeat, as in ``table.to_pylist()``."""
    return table.column(table.schema.get_all_field_indices(name)[-1])


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _is_text(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _plain(values: Any) -> Any:
    """Text values (also dictionary-encoded or views) as string / large_string, same Python values."""
    if pa.types.is_dictionary(values.type):
        values = values.cast(values.type.value_type)
    if pa.types.is_string_view(values.type):
        values = values.cast(pa.large_string())
    return values


def _bools(values: Any) -> np.ndarray:
    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def _floats(values: pa.ChunkedArray) -> np.ndarray:
    """Numbers as float64 (nulls: NaN)."""
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float64)


def _maybe_blank(values: Any) -> np.ndarray:
    """Plain text that may be missing or blank: null, or without a solid character."""
    return ~_bools(pc.match_substring_regex(values, _SOLID))


def _kept(values: Any, keep: np.ndarray | None) -> Any:
    return values if keep is None else values.filter(pa.array(keep))


def _python(values: pa.ChunkedArray, rows: np.ndarray | None = None) -> list[Any]:
    """Python values of ``values`` (at ``rows``), as ``table.to_pylist()`` has them."""
    if rows is None:
        return values.to_pylist()
    try:
        return values.take(pa.array(rows, pa.int64())).to_pylist()
    except pa.ArrowNotImplementedError:  # a type without a take kernel
        every = values.to_pylist()
        return [every[i] for i in rows]


def _rows(keep: np.ndarray | None) -> np.ndarray | None:
    return None if keep is None else np.flatnonzero(keep)


def _empty_lists(n: int) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))


def _lists(lengths: np.ndarray, values: pa.Array) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values.cast(pa.string()))


def _in_parts(build: Callable[[int, int], pa.Array], start: int, stop: int) -> list[pa.Array]:
    """``build(start, stop)``, or the rows in halves where their texts overflow 32-bit offsets (2 GiB).

    The canonical columns are ``string``; ``pa.array`` (the Python way) splits such data into chunks too.
    """
    try:
        return [build(start, stop)]
    except (pa.ArrowInvalid, pa.ArrowCapacityError) as exc:
        if stop - start < 2 or not ("too large" in str(exc) or "overflow" in str(exc)):
            raise
    mid = (start + stop) // 2
    return _in_parts(build, start, mid) + _in_parts(build, mid, stop)


def _each_chunk(values: pa.ChunkedArray, build: Callable[[pa.Array], pa.Array], type_: pa.DataType) -> pa.ChunkedArray:
    """``build`` on every chunk of ``values`` (split where its output would overflow)."""

    def part(chunk: pa.Array, start: int, stop: int) -> pa.Array:
        if stop - start == len(chunk):
            return build(chunk)
        # a copy of just these rows: casts look at the whole buffer of a slice
        return build(chunk.slice(start, stop - start).take(pa.array(np.arange(stop - start))))

    parts = [p for c in values.chunks for p in _in_parts(lambda a, b, c=c: part(c, a, b), 0, len(c))]
    return pa.chunked_array(parts, type_)


def _chunked(values: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])


class _Text:
    """A column of non-blank texts (premise, query...)."""

    def __init__(self, col: pa.ChunkedArray):
        self.col = col
        self.plain = _plain(col) if _is_text(col.type) else None

    def suspects(self) -> np.ndarray:
        if self.plain is None:  # not a text type: every value is checked (no value passes but in odd types)
            return np.ones(len(self.col), dtype=bool)
        return _maybe_blank(self.plain)

    def python(self, rows: np.ndarray | None) -> list[Any]:
        return _python(self.col if self.plain is None else self.plain, rows)

    def output(self, keep: np.ndarray | None) -> pa.ChunkedArray:
        if self.plain is None:
            return _chunked(pa.array(self.python(_rows(keep)), pa.string()))
        kept = _kept(self.plain, keep)
        return kept if kept.type == pa.string() else _each_chunk(kept, lambda c: c.cast(pa.string()), pa.string())


class _TextList:
    """A column of texts or lists of texts (``negative``...); ``None``: no such column (empty lists)."""

    def __init__(self, col: pa.ChunkedArray | None, rows: int):
        self.col, self.rows = col, rows
        t = None if col is None else col.type
        if t is None or pa.types.is_null(t):
            self.kind = "none"
        elif _is_text(t):
            self.kind, self.col = "text", _plain(col)
        elif (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) and (
            _is_text(t.value_type) or pa.types.is_null(t.value_type)
        ):
            self.kind = "list"
            item = t.value_type
            if pa.types.is_fixed_size_list(t) or not (pa.types.is_string(item) or pa.types.is_large_string(item) or pa.types.is_null(item)):
                try:  # fixed size, views, dictionaries: same Python values
                    self.col = col.cast(pa.list_(pa.large_string()))
                except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
                    self.kind, self.col = "python", col
        else:  # anything else is checked value by value
            self.kind = "python"

    def _lengths(self, chunk: pa.Array) -> np.ndarray:
        if self.kind == "text":
            return _bools(chunk.is_valid()).astype(np.int64)
        return np.asarray(pc.fill_null(pc.list_value_length(chunk), 0).to_numpy(zero_copy_only=False), dtype=np.int64)

    def suspects(self, need_one: bool = False) -> np.ndarray:
        """Rows that may hold a blank or non-text item (``need_one``: or no text at all)."""
        if self.kind == "python":
            return np.ones(self.rows, dtype=bool)
        if self.kind == "none":
            return np.full(self.rows, need_one)
        if self.kind == "text":  # a null is an empty list: fine unless one is needed
            blank = _maybe_blank(self.col)
            return blank if need_one else blank & _bools(self.col.is_valid())
        parts = [np.zeros(0, dtype=bool)]
        for chunk in self.col.chunks:
            lengths = self._lengths(chunk)
            items = chunk.flatten()
            bad_items = _maybe_blank(_plain(items)) if _is_text(items.type) else np.ones(len(items), dtype=bool)
            rows = np.zeros(len(chunk), dtype=bool)
            rows[np.repeat(np.arange(len(chunk)), lengths)[bad_items]] = True
            parts.append(rows | (lengths == 0) if need_one else rows)
        return np.concatenate(parts)

    def python(self, rows: np.ndarray | None) -> list[Any]:
        return _python(self.col, rows)

    def output(self, keep: np.ndarray | None, rows: int) -> pa.ChunkedArray:
        if self.kind == "python":
            return _chunked(pa.array([_text_list(v)[0] for v in self.python(_rows(keep))], _TEXTS))
        if self.kind == "none":
            return pa.chunked_array([_empty_lists(rows)])

        def build(chunk: pa.Array) -> pa.ListArray:
            values = chunk.drop_null() if self.kind == "text" else chunk.flatten()
            return _lists(self._lengths(chunk), _plain(values) if _is_text(values.type) else values)

        return _each_chunk(_kept(self.col, keep), build, _TEXTS)


class _Label:
    """An nli class: an integer (or integral float) in 0..num_labels-1, or a name from ``model.labels``."""

    def __init__(self, col: pa.ChunkedArray, label_names: dict[str, int], num_labels: int):
        self.col, self.label_names = col, label_names
        self.ids: np.ndarray | None = None  # class id per row (float64), where vectorised
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            self.ids = _floats(col)
        elif _is_text(col.type) and label_names:
            plain = _plain(col)
            found = _floats(pc.index_in(plain, value_set=pa.array(list(label_names), plain.type)))
            ids = np.fromiter(label_names.values(), dtype=np.float64, count=len(label_names))
            self.ids = np.full(len(found), np.nan)
            hit = ~np.isnan(found)
            self.ids[hit] = ids[found[hit].astype(np.int64)]
        if self.ids is not None:
            ids = self.ids
            self.ok = (np.floor(ids) == ids) & (ids >= 0) & (ids < num_labels)

    def suspects(self) -> np.ndarray:
        return np.ones(len(self.col), dtype=bool) if self.ids is None else ~self.ok

    def python(self, rows: np.ndarray | None) -> list[Any]:
        return _python(self.col, rows)

    def output(self, keep: np.ndarray | None) -> pa.Array:
        if self.ids is None:
            names = self.label_names
            values = self.python(_rows(keep))
            return pa.array([int(names[v] if isinstance(v, str) and v in names else v) for v in values], pa.int64())
        return pa.array((self.ids if keep is None else self.ids[keep]).astype(np.int64))


class _Number:
    """A relevance label (a number >= 0, ``labeled``) or a teacher score (any number, ``scored``)."""

    def __init__(self, col: pa.ChunkedArray, labeled: bool):
        self.col = col
        self.values = _floats(col) if pa.types.is_integer(col.type) or pa.types.is_floating(col.type) else None
        if self.values is not None:
            self.bad = np.isnan(self.values) | (self.values < 0 if labeled else False)

    def suspects(self) -> np.ndarray:
        return np.ones(len(self.col), dtype=bool) if self.values is None else self.bad

    def python(self, rows: np.ndarray | None) -> list[Any]:
        return _python(self.col, rows)

    def output(self, keep: np.ndarray | None) -> pa.Array:
        if self.values is None:
            return pa.array([float(v) for v in self.python(_rows(keep))], pa.float64())
        return pa.array(self.values if keep is None else self.values[keep])


def _append_columns(lists: pa.ChunkedArray, extras: list[pa.ChunkedArray]) -> pa.ChunkedArray:
    """``lists[i] + [extras[0][i], extras[1][i], ...]`` for every row ``i``."""

    def build(start: int, stop: int) -> pa.ListArray:
        part = [c.slice(start, stop - start).combine_chunks() for c in (lists, *extras)]
        return _append_texts(part[0], part[1:])

    return pa.chunked_array(_in_parts(build, 0, len(lists)), _TEXTS)


def _append_texts(lists: pa.ListArray, extras: list[pa.Array]) -> pa.ListArray:
    n, k = len(lists), len(extras)
    offsets = lists.offsets.to_numpy().astype(np.int64)
    values = lists.values.slice(offsets[0], offsets[-1] - offsets[0]).cast(pa.string())
    offsets -= offsets[0]
    lengths, first = np.diff(offsets), len(values)
    out_offsets = offsets + k * np.arange(n + 1)
    take = np.empty(out_offsets[-1], np.int64)
    take[np.arange(first) + k * np.repeat(np.arange(n), lengths)] = np.arange(first)
    slots = (offsets[1:] + k * np.arange(n))[:, None] + np.arange(k)
    take[slots.ravel()] = (first + np.arange(k) * n + np.arange(n)[:, None]).ravel()
    flat = pa.concat_arrays([values, *(e.cast(pa.string()) for e in extras)]).take(pa.array(take))
    return pa.ListArray.from_arrays(pa.array(out_offsets.astype(np.int32)), flat)


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
    described: str | None = None,
) -> CheckedRows:
    """Validate rows of one split and bring them to canonical columns.

    Args:
        table: rows as read by :func:`read_source`.
        job: the job (task, labels, ``data.drop_invalid``).
        split: ``train``, ``eval`` or ``test``.
        key: config key for messages (``data.train``, ``data.train[1]``).
        described: the source as messages name it (default: ``data.<split>``'s path or hub id).

    Returns:
        :class:`CheckedRows` with canonical columns: nli → premise, hypothesis, label (int64);
        rerank train → query, positive, negatives (list) for ``pairs``, or query, passage, label
        (float) for ``labeled``/``scored``; rerank eval → query, positive (list), negative (list).

    Raises:
        DataError: missing columns, or invalid rows while ``data.drop_invalid`` is false.
    """
    described = described or getattr(job.data, split).describe()
    layout = _layout(job.task, split, table.column_names, key)
    num_rows = table.num_rows
    label_names = {name: i for i, name in enumerate(job.model.labels or [])}
    neg_cols = sorted(
        (c for c in table.column_names if re.fullmatch(r"negative_\d+", c)), key=lambda c: int(c.split("_")[1])
    )
    # Every column the rules read, by name; each marks its suspect rows.
    views: dict[str, Any] = {c: _Text(_column(table, c)) for c in _TEXT_COLUMNS[layout]}
    suspects = np.zeros(num_rows, dtype=bool)
    for view in views.values():
        suspects |= view.suspects()
    has_negative = "negative" in table.column_names
    if layout == "nli":
        views["label"] = label = _Label(_column(table, "label"), label_names, job.num_labels)
        suspects |= label.suspects()
    elif layout == "pairs":
        negative = _TextList(_column(table, "negative") if has_negative else None, num_rows)
        suspects |= negative.suspects()
        if has_negative:
            views["negative"] = negative
        for c in neg_cols:
            if c not in views:
                views[c] = _Text(_column(table, c))
                suspects |= views[c].suspects()
    elif layout in ("labeled", "scored"):
        column = "score" if layout == "scored" else "label"
        views[column] = number = _Number(_column(table, column), layout == "labeled")
        suspects |= number.suspects()
    else:
        views["positive"] = positive = _TextList(_column(table, "positive"), num_rows)
        negative = _TextList(_column(table, "negative") if has_negative else None, num_rows)
        suspects |= positive.suspects(need_one=True) | negative.suspects()
        if has_negative:
            views["negative"] = negative

    # Only suspect rows go through the rules in Python; the rules decide (some suspects are fine).
    problems: dict[int, str] = {}
    rows = np.flatnonzero(suspects)
    if rows.size:
        values = {c: view.python(rows) for c, view in views.items()}
        for j, i in enumerate(rows.tolist()):
            why = _row_problem(layout, {c: v[j] for c, v in values.items()}, label_names, job.num_labels, neg_cols)
            if why:
                problems[i] = why

    listed = [f"row {i}: {why}" for i, why in sorted(problems.items())]
    if problems and not job.data.drop_invalid:
        more = f" (and {len(listed) - MAX_LISTED_ROWS} more)" if len(listed) > MAX_LISTED_ROWS else ""
        raise DataError(
            f"{key}: {len(problems)} invalid row(s) of {num_rows} in {described}: "
            + "; ".join(listed[:MAX_LISTED_ROWS])
            + more
            + ". Fix them, or set data.drop_invalid: true to drop them."
        )
    if problems:
        logger.warning("%s: dropped %d invalid row(s) of %d: %s", key, len(problems), num_rows, "; ".join(listed[:MAX_LISTED_ROWS]))
    if len(problems) == num_rows:
        raise DataError(f"{key}: no valid rows in {described}")

    keep = None
    if problems:
        keep = np.ones(num_rows, dtype=bool)
        keep[list(problems)] = False
    kept = num_rows - len(problems)
    columns: list[Any] = [views[c].output(keep) for c in _TEXT_COLUMNS[layout]]
    if layout == "nli":
        columns.append(label.output(keep))
    elif layout == "pairs":
        lists = negative.output(keep, kept)
        if neg_cols:
            lists = _append_columns(lists, [views[c].output(keep) for c in neg_cols])
        columns.append(lists)
    elif layout in ("labeled", "scored"):
        columns.append(number.output(keep))
    else:
        columns += [positive.output(keep, kept), negative.output(keep, kept)]
    return CheckedRows(pa.Table.from_arrays(columns, schema=_SCHEMAS[layout]), layout, len(problems), listed)
