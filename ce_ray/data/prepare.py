"""Prepared data: the one way from a job to rows every worker can read.

:func:`prepare_split` runs the steps once each, in order, on the driver before any worker starts,
so bad rows fail the command before Ray does any work::

    read (data.read) -> check (data.check) -> group (data.groups) -> mine (data.mining)
        -> shape (data.shape) -> write (here)

The result is saved with ``datasets``' ``save_to_disk`` (Arrow files) under ``data.cache_dir``
(default ``<run.output_dir>/data``), keyed by a fingerprint of the source files and every setting
that changes the rows. Workers open it with :func:`load_prepared`: the Arrow files are
memory-mapped, so N workers on a node share one copy in the page cache instead of each holding the
dataset, and each worker's sampler reads only its shard.

Mined negatives are cached the same way, so tune trials that share data mine once.

``data.train`` may be a list of sources. Each is read and checked on its own (errors name it:
``data.train[1]``), grouped and shaped on its own, then mixed into one training set by ``data.mix``
(:func:`mix_sources`). Mining runs once over all of them: every query is searched against the positives of
every source, so a negative may come from another source (a harder, more varied pool; the cost is that a
new source re-mines the others). The prepared split records its rows per source (``PreparedSplit.sources``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from ce_ray import storage
from ce_ray.config import ConfigError, JobConfig
from ce_ray.data.check import CheckedRows, check_rows
from ce_ray.data.errors import DataError
from ce_ray.data.groups import RerankGroups, rerank_groups
from ce_ray.data.mining import mine_negatives, needs_mining, with_eval_negatives
from ce_ray.data.read import read_source, source_fingerprint
from ce_ray.data.shape import shape_rows
from ce_ray.tasks import LOSSES

__all__ = [
    "PreparedData",
    "PreparedSplit",
    "check_batch_fits",
    "fingerprint",
    "load_prepared",
    "load_sources",
    "load_split",
    "mix_sources",
    "prepare_data",
    "prepare_split",
    "sources_text",
]

logger = logging.getLogger(__name__)


@dataclass
class PreparedSplit:
    """One saved split: where it is and what it holds."""

    uri: str
    rows: int
    dropped: int
    columns: list[str]
    # data.train: one entry per source, {name, key, read, dropped, rows} (rows: training rows it gives after data.mix)
    sources: list[dict[str, Any]] | None = None
    # where it was prepared: {"path": "driver"} or {"path": "cluster", "node": Ray node id}
    prepared_on: dict[str, Any] | None = None


@dataclass
class PreparedData:
    """What the workers need: the shaped training rows and the eval rows."""

    train: PreparedSplit
    eval: PreparedSplit

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PreparedData:
        return cls(PreparedSplit(**raw["train"]), PreparedSplit(**raw["eval"]))


def cache_root(job: JobConfig) -> str:
    return job.data.cache_dir or storage.join(job.run.output_dir, "data")


def _save_table(table: pa.Table, uri: str) -> None:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()

    with tempfile.TemporaryDirectory(prefix="ce_ray_data_") as tmp:
        Dataset(table).save_to_disk(os.path.join(tmp, "ds"))
        storage.publish_dir(os.path.join(tmp, "ds"), uri)


def _rows_key(job: JobConfig, split: str) -> dict[str, Any]:
    src = getattr(job.data, split)
    if split == "train" and isinstance(src, list):
        source: Any = [source_fingerprint(one) for one in src]
        if len(src) > 1:
            source = {"sources": source, "mix": job.data.mix, "weights": [one.weight for one in src]}
    else:
        source = source_fingerprint(src)
    return {
        "source": source,
        "task": job.task,
        "split": split,
        "num_labels": job.num_labels,
        "labels": job.model.labels,
        "drop_invalid": job.data.drop_invalid,
    }


def load_sources(job: JobConfig) -> list[CheckedRows]:
    """Read and check each source of ``data.train`` (steps 1-2, not cached); errors name ``data.train[i]``."""
    if job.data.train is None:
        raise ConfigError("data.train: required for this command; set it in the job file or with --set data.train=PATH")
    out = []
    for i, src in enumerate(job.data.train_sources):
        key = job.data.train_key(i)
        out.append(check_rows(read_source(src, key), job, "train", key, src.describe()))
    return out


def load_split(job: JobConfig, split: str, key: str | None = None) -> CheckedRows:
    """Read and check ``data.<split>`` of a job (steps 1-2, not cached); errors name ``key`` (default ``data.<split>``).

    A ``data.train`` list comes back as one table of all its sources' rows (they must have the same layout).
    """
    src = getattr(job.data, split)
    if src is None:
        raise ConfigError(f"data.{split}: required for this command; set it in the job file or with --set data.{split}=PATH")
    if split == "train" and isinstance(src, list):
        parts = load_sources(job)
        _same_layout(job, parts)
        return CheckedRows(
            pa.concat_tables([p.table for p in parts]), parts[0].layout, sum(p.dropped for p in parts),
            [f"{job.data.train_key(i)}: {why}" for i, p in enumerate(parts) for why in p.problems],
        )  # fmt: skip
    key = key or f"data.{split}"
    return check_rows(read_source(src, key), job, split, key)


def _same_layout(job: JobConfig, parts: list[CheckedRows]) -> None:
    layouts = [p.layout for p in parts]
    if len(set(layouts)) > 1:
        described = ", ".join(f"{job.data.train_key(i)} {layout}" for i, layout in enumerate(layouts))
        raise DataError(
            f"data.train: the sources have different layouts ({described}); mix sources of one kind (all positive "
            "pairs, or all labeled/scored passages), or map their columns to the same names with data.train[i].columns"
        )


def _concat_groups(parts: list[RerankGroups]) -> RerankGroups:
    return RerankGroups(
        [q for g in parts for q in g.queries], [d for g in parts for d in g.docs], [lab for g in parts for lab in g.labels],
        parts[0].kind,
    )  # fmt: skip


def _mined(
    job: JobConfig, groups: list[RerankGroups], mine: list[bool], device: str | None, on_cluster: bool = False
) -> list[RerankGroups]:
    """``groups`` (one per source) with mined negatives where ``mine`` says, cached by sources and mining settings.

    One search over all sources: the queries of the sources to mine are searched against the positives of every
    source, so a negative may come from another source.
    """
    key = fingerprint(_rows_key(job, "train"), job.data.negatives.rows_key(), mine, "mined-v1")
    uri = storage.join(cache_root(job), f"mined-{key}")
    todo = [g for g, m in zip(groups, mine) if m]
    if storage.exists(storage.join(storage.current(uri), "dataset_info.json")):
        table = load_prepared(uri).data.table
        mined = RerankGroups(
            table.column("query").to_pylist(), table.column("docs").to_pylist(), table.column("labels").to_pylist(),
            todo[0].kind,
        )  # fmt: skip
    else:
        others = [d for g, m in zip(groups, mine) if not m for ds, labs in zip(g.docs, g.labels) for d, lab in zip(ds, labs) if lab > 0]
        mined = mine_negatives(_concat_groups(todo), job.data.negatives, device=device, corpus=others or None, on_cluster=on_cluster)
        _save_table(pa.table({"query": mined.queries, "docs": mined.docs, "labels": mined.labels}), uri)
    out, start = [], 0
    for g, m in zip(groups, mine):
        if not m:
            out.append(g)
            continue
        end = start + len(g.queries)
        out.append(RerankGroups(mined.queries[start:end], mined.docs[start:end], mined.labels[start:end], g.kind))
        start = end
    return out


def _train_tables(job: JobConfig, parts: list[CheckedRows], device: str | None, on_cluster: bool = False) -> list[pa.Table]:
    """Steps 3-5 for each source's training rows: group (rerank), mine when the loss needs it, shape for the loss."""
    spec = LOSSES[job.loss.name]
    if job.task != "rerank":
        return [shape_rows(spec, rows, None, job.data.negatives.num) for rows in parts]
    groups = [rerank_groups(rows) for rows in parts]
    mine = [needs_mining(spec, g, job.data.negatives.mine) for g in groups]
    if any(mine):
        groups = _mined(job, groups, mine, device, on_cluster)
    return [shape_rows(spec, rows, g, job.data.negatives.num) for rows, g in zip(parts, groups)]


def mix_sources(job: JobConfig, tables: list[pa.Table]) -> tuple[pa.Table, list[int]]:
    """The shaped tables of ``data.train``'s sources as one training table (``data.mix``), and the rows each gives.

    - ``concat``: every row of every source (training shuffles them together);
    - ``weighted``: the total row count stays, and source i gets ``weight_i / sum(weights)`` of it: a random
      subset (seeded with ``train.seed``) of a source with more rows, its rows repeated (then a random subset) for
      one with fewer;
    - ``proportional`` / ``round_robin``: every row, plus a ``source`` column (the source's index) from which the
      training workers build one dataset per source for sentence-transformers' multi-dataset batch samplers.
    """
    import numpy as np

    if len(tables) > 1:  # n-tuple shapes: as many negative columns as every source has
        common = [c for c in tables[0].column_names if all(c in t.column_names for t in tables)]
        tables = [t.select(common) for t in tables]
    if len(tables) == 1 or job.data.mix == "concat":
        return (tables[0] if len(tables) == 1 else pa.concat_tables(tables)), [t.num_rows for t in tables]
    if job.data.mix == "weighted":
        weights = [src.weight or 1.0 for src in job.data.train_sources]
        total = sum(t.num_rows for t in tables)
        rng = np.random.default_rng(job.train.seed)
        out = []
        for t, w in zip(tables, weights):
            want = max(1, round(total * w / sum(weights)))
            repeats, rest = divmod(want, t.num_rows)
            index = np.concatenate([np.tile(np.arange(t.num_rows), repeats), np.sort(rng.choice(t.num_rows, rest, replace=False))])
            out.append(t.take(pa.array(index)))
        return pa.concat_tables(out), [t.num_rows for t in out]
    tagged = [t.append_column("source", pa.array(np.full(t.num_rows, i, dtype=np.int16))) for i, t in enumerate(tables)]
    return pa.concat_tables(tagged), [t.num_rows for t in tables]


def prepare_split(job: JobConfig, split: str, device: str | None = None, on_cluster: bool = False) -> PreparedSplit:
    """Read, check (and for ``train``: group, mine, shape) one split and save it; reuse a cached copy.

    ``data.train`` goes to the cluster when :func:`ce_ray.data.on_cluster.prepare_where` says so (the cache is
    checked first, here); ``on_cluster=True`` is that task's own call (mining as Ray Data work).

    Raises:
        ConfigError / DataError: the split is not configured, or its rows are invalid.
    """
    rows_key = _rows_key(job, split)
    if split == "train":
        rows_key |= {"loss": LOSSES[job.loss.name].shape, "negatives": job.data.negatives.rows_key()}
    elif job.task == "rerank":  # eval rows may get mined negatives
        rows_key |= {"negatives": job.data.negatives.rows_key()}
    uri = storage.join(cache_root(job), f"{split}-{fingerprint(rows_key, 'v1')}")
    meta_uri = storage.join(uri, "ce_ray_split.json")
    if storage.exists(meta_uri):
        logger.info("data.%s: using prepared rows at %s", split, uri)
        return PreparedSplit(**storage.read_json(meta_uri))
    sources = None
    if split == "train" and not on_cluster:
        from ce_ray.data.on_cluster import prepare_on_cluster, prepare_where

        if prepare_where(job) == "cluster":
            return prepare_on_cluster(job)
    if split == "train":
        parts = load_sources(job)
        _same_layout(job, parts)
        table, given = mix_sources(job, _train_tables(job, parts, device, on_cluster))
        dropped = sum(p.dropped for p in parts)
        sources = [
            {"name": src.label(), "key": job.data.train_key(i), "read": p.num_rows + p.dropped, "dropped": p.dropped,
             "rows": n}
            for i, (src, p, n) in enumerate(zip(job.data.train_sources, parts, given))
        ]  # fmt: skip
    else:
        rows = load_split(job, split)
        dropped = rows.dropped
        table = with_eval_negatives(rows.table, job.data.negatives, device=device) if job.task == "rerank" else rows.table
    _save_table(table, uri)
    where: dict[str, Any] = {"path": "driver"}
    if on_cluster:
        import ray

        where = {"path": "cluster", "node": ray.get_runtime_context().get_node_id()}
    prepared = PreparedSplit(
        uri=uri, rows=table.num_rows, dropped=dropped, columns=table.column_names, sources=sources, prepared_on=where
    )
    storage.write_json(meta_uri, asdict(prepared))
    return prepared


def sources_text(sources: list[dict[str, Any]] | None) -> str:
    """``qa-train 9,907 (of 9,907 read), qa-extra 16,883 (...)``: a data.train list's rows per source, for the console."""
    parts = []
    for src in sources or ():
        dropped = f", {src['dropped']:,} dropped" if src.get("dropped") else ""
        parts.append(f"{src['key']} {src['name']} {src['rows']:,} (of {src['read']:,} read{dropped})")
    return "; ".join(parts)


def check_batch_fits(rows: int, batch_size: int, source: str, key: str = "train.batch_size") -> None:
    """Fail before Ray starts when one global batch is larger than the prepared training rows (no step could run)."""
    if batch_size > rows:
        raise ConfigError(
            f"{key}: {batch_size} is more than the {rows} prepared training rows of {source}, so no step would run; "
            "use a smaller batch or more rows"
        )


def prepare_data(job: JobConfig, device: str | None = None) -> PreparedData:
    """Prepare ``data.train`` and ``data.eval`` of a job (see module docstring)."""
    job.require_data("train", "eval")
    # eval first: it is cheap, and a bad eval file should fail before mining starts
    eval_split = prepare_split(job, "eval")
    train_split = prepare_split(job, "train", device=device)
    check_batch_fits(train_split.rows, job.train.batch_size, job.data.describe_train())
    return PreparedData(train=train_split, eval=eval_split)


def load_prepared(uri: str):
    """Open a prepared split as a memory-mapped ``datasets.Dataset`` (downloaded once per node if remote)."""
    from datasets import Dataset

    return Dataset.load_from_disk(storage.download_dir(uri))


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (cache keys for prepared data)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
