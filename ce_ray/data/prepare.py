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
    "load_split",
    "prepare_data",
    "prepare_split",
]

logger = logging.getLogger(__name__)


@dataclass
class PreparedSplit:
    """One saved split: where it is and what it holds."""

    uri: str
    rows: int
    dropped: int
    columns: list[str]


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
    return {
        "source": source_fingerprint(src),
        "task": job.task,
        "split": split,
        "num_labels": job.num_labels,
        "labels": job.model.labels,
        "drop_invalid": job.data.drop_invalid,
    }


def load_split(job: JobConfig, split: str, key: str | None = None) -> CheckedRows:
    """Read and check ``data.<split>`` of a job (steps 1-2, not cached); errors name ``key`` (default ``data.<split>``)."""
    src = getattr(job.data, split)
    if src is None:
        raise ConfigError(f"data.{split}: required for this command; set it in the job file or with --set data.{split}=PATH")
    key = key or f"data.{split}"
    return check_rows(read_source(src, key), job, split, key)


def _mined(job: JobConfig, groups: RerankGroups, device: str | None) -> RerankGroups:
    """``groups`` plus mined negatives, cached under the data cache by source and mining settings."""
    key = fingerprint(_rows_key(job, "train"), job.data.negatives.model_dump(mode="json"), "mined-v1")
    uri = storage.join(cache_root(job), f"mined-{key}")
    if storage.exists(storage.join(storage.current(uri), "dataset_info.json")):
        table = load_prepared(uri).data.table
        return RerankGroups(
            table.column("query").to_pylist(),
            table.column("docs").to_pylist(),
            table.column("labels").to_pylist(),
            groups.kind,
        )
    mined = mine_negatives(groups, job.data.negatives, device=device)
    _save_table(pa.table({"query": mined.queries, "docs": mined.docs, "labels": mined.labels}), uri)
    return mined


def _train_table(job: JobConfig, rows: CheckedRows, device: str | None) -> pa.Table:
    """Steps 3-5 for training rows: group (rerank), mine when the loss needs it, shape for the loss."""
    spec = LOSSES[job.loss.name]
    groups = None
    if job.task == "rerank":
        groups = rerank_groups(rows)
        if needs_mining(spec, groups, job.data.negatives.mine):
            groups = _mined(job, groups, device)
    return shape_rows(spec, rows, groups, job.data.negatives.num)


def prepare_split(job: JobConfig, split: str, device: str | None = None) -> PreparedSplit:
    """Read, check (and for ``train``: group, mine, shape) one split and save it; reuse a cached copy.

    Raises:
        ConfigError / DataError: the split is not configured, or its rows are invalid.
    """
    rows_key = _rows_key(job, split)
    if split == "train":
        rows_key |= {"loss": LOSSES[job.loss.name].shape, "negatives": job.data.negatives.model_dump(mode="json")}
    elif job.task == "rerank":  # eval rows may get mined negatives
        rows_key |= {"negatives": job.data.negatives.model_dump(mode="json")}
    uri = storage.join(cache_root(job), f"{split}-{fingerprint(rows_key, 'v1')}")
    meta_uri = storage.join(uri, "ce_ray_split.json")
    if storage.exists(meta_uri):
        logger.info("data.%s: using prepared rows at %s", split, uri)
        return PreparedSplit(**storage.read_json(meta_uri))
    rows = load_split(job, split)
    if split == "train":
        table = _train_table(job, rows, device)
    elif job.task == "rerank":
        table = with_eval_negatives(rows.table, job.data.negatives, device=device)
    else:
        table = rows.table
    _save_table(table, uri)
    prepared = PreparedSplit(uri=uri, rows=table.num_rows, dropped=rows.dropped, columns=table.column_names)
    storage.write_json(meta_uri, asdict(prepared))
    return prepared


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
    check_batch_fits(train_split.rows, job.train.batch_size, job.data.train.describe())
    return PreparedData(train=train_split, eval=eval_split)


def load_prepared(uri: str):
    """Open a prepared split as a memory-mapped ``datasets.Dataset`` (downloaded once per node if remote)."""
    from datasets import Dataset

    return Dataset.load_from_disk(storage.download_dir(uri))


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able parts (cache keys for prepared data)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
