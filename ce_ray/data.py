"""Reading, checking and shaping the rows of a job.

Data flows in three steps, all on the driver before any worker starts:

1. :func:`read_source` loads a :class:`~ce_ray.config.DataSource` (a local/remote Parquet, JSONL or
   CSV file, or a hub dataset) into a ``pyarrow.Table`` and renames columns per ``columns:``.
2. :func:`check_rows` validates the rows for the task and split. Problems are reported with row
   numbers (0-based, after ``select``); with ``data.drop_invalid: true`` bad rows are dropped and
   counted instead.
3. :func:`shape_for_loss` turns checked training rows into the columns the chosen loss expects
   (see :mod:`ce_ray.losses`), mining hard negatives when the loss needs them and the data has none.

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

import hashlib
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from ce_ray.config import ConfigError, DataSource, JobConfig, NegativesConfig
from ce_ray.storage import filesystem_and_path, stat_fingerprint

__all__ = [
    "CheckedRows",
    "DataError",
    "RerankGroups",
    "check_rows",
    "read_source",
    "rerank_groups",
    "load_split",
]

logger = logging.getLogger(__name__)

MAX_LISTED_ROWS = 10


class DataError(ConfigError):
    """Rows that do not fit the task; the message names the data key, the rows and the fix."""


# --------------------------------------------------------------------------------------------
# 1. read
# --------------------------------------------------------------------------------------------
def _file_format(src: DataSource) -> str:
    if src.format != "auto":
        return src.format
    path = src.path.lower().split("?")[0]  # type: ignore[union-attr]
    if path.endswith(".parquet"):
        return "parquet"
    if path.endswith((".jsonl", ".json", ".jsonl.gz")):
        return "jsonl"
    return "csv"


def read_source(src: DataSource, key: str) -> pa.Table:
    """Load one data source as a ``pyarrow.Table`` with its columns renamed per ``src.columns``.

    Args:
        src: the source (file path/URI or hub dataset).
        key: its config key (``data.train``...), used in error messages.

    Raises:
        DataError: the file or hub dataset cannot be read, or a mapped column does not exist.
    """
    if src.path is not None:
        table = _read_file(src, key)
    else:
        table = _read_hub(src, key)
    if src.offset or src.select is not None:
        table = table.slice(src.offset, src.select)
    missing = [source for source in src.columns.values() if source not in table.column_names]
    if missing:
        raise DataError(
            f"{key}.columns: column(s) {missing} not in {src.describe()} (it has {table.column_names})"
        )
    renames = {source: target for target, source in src.columns.items()}
    return table.rename_columns([renames.get(name, name) for name in table.column_names])


def _read_file(src: DataSource, key: str) -> pa.Table:
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    fs, path = filesystem_and_path(src.path)  # type: ignore[arg-type]
    fmt = _file_format(src)
    try:
        if fmt == "parquet":
            return pq.read_table(path, filesystem=fs)
        compression = "gzip" if path.endswith(".gz") else None
        with fs.open_input_stream(path, compression=compression) as stream:
            if fmt == "jsonl":
                return pajson.read_json(stream)
            return pacsv.read_csv(stream)
    except FileNotFoundError:
        raise DataError(f"{key}: file not found: {src.path}") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{key}: cannot read {src.path} as {fmt} ({exc}); check the file or set {key}.format") from None


def _read_hub(src: DataSource, key: str) -> pa.Table:
    import datasets

    try:
        ds = datasets.load_dataset(src.hub, src.subset, split=src.split)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError...)
        hint = ""
        if "offline" in str(exc).lower() or "connect" in str(exc).lower():
            hint = " (offline? HF_HUB_OFFLINE=1 needs the dataset in the local HF cache; or use a local file)"
        raise DataError(f"{key}: cannot load hub dataset {src.describe()}: {exc}{hint}") from None
    return ds.data.table.combine_chunks() if hasattr(ds.data, "table") else ds.with_format("arrow")[:]


# --------------------------------------------------------------------------------------------
# 2. check
# --------------------------------------------------------------------------------------------
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


def load_split(job: JobConfig, split: str) -> CheckedRows:
    """Read and check ``data.<split>`` of a job (see :func:`read_source`, :func:`check_rows`)."""
    src = getattr(job.data, split)
    if src is None:
        raise ConfigError(f"data.{split}: required for this command; set it in the job file or with --set data.{split}=PATH")
    key = f"data.{split}"
    return check_rows(read_source(src, key), job, split, key)


def source_fingerprint(src: DataSource) -> dict[str, Any]:
    """What identifies a source's content: its spec plus, for files, size and modification time."""
    info: dict[str, Any] = src.model_dump(mode="json")
    if src.path is not None:
        info["stat"] = stat_fingerprint(src.path)
    return info


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (cache keys for prepared data)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# 3. rerank groups and mining
# --------------------------------------------------------------------------------------------
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


def mine_negatives(groups: RerankGroups, cfg: NegativesConfig, device: str | None = None) -> RerankGroups:
    """Add hard negatives to positive-only groups with sentence-transformers' ``mine_hard_negatives``.

    Every (query, positive) pair is searched against all positives of the dataset with the bi-encoder
    ``cfg.model``; candidates that are the query's own positives are excluded by the library.
    Queries for which too few candidates pass the filters keep only what was found.
    """
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from ce_ray.modeling import resolve_model_name

    pairs_q, pairs_p = [], []
    for q, ds, labs in zip(groups.queries, groups.docs, groups.labels):
        for d, lab in zip(ds, labs):
            if lab > 0:
                pairs_q.append(q)
                pairs_p.append(d)
    if not pairs_q:
        raise DataError("data.train: no positive pairs to mine negatives for")
    encoder = SentenceTransformer(resolve_model_name(cfg.model), device=device)
    dataset = Dataset.from_dict({"query": pairs_q, "positive": pairs_p})
    mined = mine_hard_negatives(
        dataset,
        encoder,
        range_min=cfg.range_min,
        range_max=min(cfg.range_max, max(len(set(pairs_p)) - 1, 1)),
        max_score=cfg.max_score,
        relative_margin=cfg.relative_margin,
        num_negatives=cfg.num,
        sampling_strategy=cfg.sampling,
        batch_size=cfg.batch_size,
        output_format="labeled-list",
        verbose=False,
    )
    by_query: dict[str, tuple[list[str], list[float]]] = {}
    for row in mined:
        docs, labels = by_query.setdefault(row["query"], ([], []))
        for d, lab in zip(row[mined.column_names[1]], row[mined.column_names[2]]):
            if d not in docs:
                docs.append(d)
                labels.append(float(lab))
    docs_out, labels_out = [], []
    for q, ds, labs in zip(groups.queries, groups.docs, groups.labels):
        extra_docs, extra_labels = by_query.get(q, ([], []))
        merged_docs, merged_labels = list(ds), list(labs)
        for d, lab in zip(extra_docs, extra_labels):
            if d not in merged_docs:
                merged_docs.append(d)
                merged_labels.append(lab)
        docs_out.append(merged_docs)
        labels_out.append(merged_labels)
    found = sum(sum(1 for lab in labs if lab <= 0) for labs in labels_out)
    logger.info("mined %d hard negatives for %d queries with %s", found, len(groups.queries), cfg.model)
    return RerankGroups(list(groups.queries), docs_out, labels_out, groups.kind)
