"""Step 1 of preparing data: read one source into a ``pyarrow.Table`` with the task's column names.

A :class:`~ce_ray.config.DataSource` is a local/remote Parquet, JSONL or CSV file or a hub dataset;
``columns:`` renames columns, ``offset``/``select`` slice rows.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from ce_ray.config import DataSource
from ce_ray.data.errors import DataError
from ce_ray.storage import filesystem_and_path, stat_fingerprint

__all__ = ["file_format", "read_source", "source_fingerprint"]


def file_format(src: DataSource) -> str:
    """A file source's format: ``format``, or by the file's extension (``auto``)."""
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
    fmt = file_format(src)
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


def source_fingerprint(src: DataSource) -> dict[str, Any]:
    """What identifies a source's content: its spec plus, for files, size and modification time."""
    info: dict[str, Any] = src.model_dump(mode="json", exclude={"name", "weight"})  # neither changes the rows
    if src.path is not None:
        info["stat"] = stat_fingerprint(src.path)
    return info


def save_in_memory(rows: Any, job: Any, split: str) -> dict[str, Any]:
    """In-memory rows (``datasets.Dataset``, ``pyarrow.Table``, ``pandas.DataFrame``) as a Parquet source.

    Written once per content under ``<data cache>/inputs/`` (temp file, then rename), so Ray workers and
    the prepared-data cache see an ordinary file; returns the ``data.<split>`` source for it.

    Raises:
        DataError: ``rows`` is none of the types above.
    """
    import hashlib
    import os
    import tempfile

    import pyarrow.parquet as pq

    from ce_ray import storage

    if isinstance(rows, pa.Table):
        table = rows
    elif hasattr(rows, "data") and hasattr(rows.data, "table"):  # datasets.Dataset
        table = rows.with_format("arrow")[:] if getattr(rows, "_indices", None) is not None else rows.data.table
    elif type(rows).__name__ == "DataFrame":
        table = pa.Table.from_pandas(rows, preserve_index=False)
    else:
        raise DataError(
            f"data.{split}: in-memory rows must be a datasets.Dataset, pyarrow.Table or pandas.DataFrame, "
            f"got {type(rows).__name__}; or give a file path"
        )
    table = table.replace_schema_metadata(None)  # pandas/datasets metadata: the same rows give the same file
    inputs = storage.join(job.data.cache_dir or storage.join(job.run.output_dir, "data"), "inputs")
    with tempfile.TemporaryDirectory(prefix="ce_ray_rows_") as tmp:
        local = os.path.join(tmp, "rows.parquet")
        pq.write_table(table, local)
        with open(local, "rb") as f:
            data = f.read()
    uri = storage.join(inputs, f"{split}-{hashlib.sha256(data).hexdigest()[:16]}.parquet")
    if not storage.exists(uri):  # same content, same file: its stat (and the caches keyed on it) stay put
        storage.write_bytes(uri, data)
    return {"path": uri}
