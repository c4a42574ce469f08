"""Preparing ``data.train`` on the Ray cluster instead of in the driver (``data.prepare_on``).

On a real cluster the driver is the ``ray job submit`` entrypoint on the head node, which is usually small and
has no GPU. With ``data.prepare_on: cluster`` (or ``auto`` above ``data.prepare_cluster_rows`` rows, or when
the cluster has GPUs the driver's node lacks) the driver holds only metadata:

- :func:`prepare_on_cluster` runs the train split's steps (read, check, group, mine, shape, write:
  :func:`ce_ray.data.prepare.prepare_split`) as one Ray task on the node with the most GPUs, then CPUs, other
  than the driver's. It writes under the same cache key as the driver path, to storage every node sees. A bad
  row raises the same :class:`~ce_ray.data.errors.DataError` on the driver, before training starts; a task
  lost with its node is retried (``max_retries``), and a second run is a cache hit that starts no task.
- :func:`mine_on_cluster` is its mining step as Ray Data work: an actor pool of the ``data.negatives.model``
  encoder embeds the corpus (every positive, plus other sources' positives) and the queries
  (``map_batches``; ``data.negatives.num_gpus`` / ``concurrency``), then a second actor pool, each actor
  holding the corpus embeddings once (one object-store copy per node), runs the exact top-k search (on its GPU
  where it has one) and ``mine_hard_negatives``' filters over shards of the queries
  (:func:`ce_ray.data.mining.select_negatives`).
  With ``sampling: top`` the negatives are the driver path's, up to ties in score.

What is not spread out: reading, checking and shaping run inside the one preparation task (on a worker node,
not the driver), and the corpus embeddings are gathered there before the search.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from ce_ray import console, storage
from ce_ray.config import ConfigError, JobConfig, NegativesConfig
from ce_ray.data.errors import DataError
from ce_ray.data.read import file_format

if TYPE_CHECKING:
    from ce_ray.data.prepare import PreparedSplit

__all__ = ["estimated_train_rows", "mine_on_cluster", "prepare_on_cluster", "prepare_where"]

logger = logging.getLogger(__name__)


def estimated_train_rows(job: JobConfig) -> int | None:
    """``data.train``'s rows from the Parquet footers (and ``select``), without reading the rows; None when a
    source is not a Parquet file (JSONL, CSV, hub)."""
    import pyarrow.parquet as pq

    total = 0
    for src in job.data.train_sources:
        if src.path is None or file_format(src) != "parquet":
            return None
        fs, path = storage.filesystem_and_path(src.path)
        try:
            rows = pq.ParquetFile(fs.open_input_file(path)).metadata.num_rows
        except (OSError, ValueError):
            return None  # a missing or bad file is reported by the read step, with its key
        rows = max(rows - src.offset, 0)
        total += rows if src.select is None else min(rows, src.select)
    return total


def _cluster_has_gpus_the_driver_lacks() -> bool:
    """Only for a driver already on a Ray cluster (``ray job submit``, ``RAY_ADDRESS``): no local Ray is started."""
    if not (os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID")):
        import ray

        if not ray.is_initialized():
            return False
    import ray

    from ce_ray.runtime import ensure_ray

    ensure_ray()
    here = ray.get_runtime_context().get_node_id()
    local = next((n["Resources"].get("GPU", 0) for n in ray.nodes() if n["NodeID"] == here), 0)
    return ray.cluster_resources().get("GPU", 0) > local


def prepare_where(job: JobConfig) -> str:
    """``driver`` or ``cluster``: where ``data.train`` of this job is prepared (``data.prepare_on``)."""
    if job.data.prepare_on != "auto":
        return job.data.prepare_on
    rows = estimated_train_rows(job)
    if rows is not None and rows > job.data.prepare_cluster_rows:
        return "cluster"
    return "cluster" if _cluster_has_gpus_the_driver_lacks() else "driver"


def _preparation_node() -> str | None:
    """The alive node, other than the driver's, with the most GPUs then CPUs (None: there is only the driver's)."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    nodes = [
        n for n in ray.nodes()
        if n["Alive"] and n["NodeID"] != here and (n["Resources"].get("CPU", 0) or n["Resources"].get("GPU", 0))
    ]  # fmt: skip
    if not nodes:
        return None
    return max(nodes, key=lambda n: (n["Resources"].get("GPU", 0), n["Resources"].get("CPU", 0)))["NodeID"]


_progress = None  # in the preparation task: the driver's queue for progress lines


def _say(text: str) -> None:
    """A progress line: to the driver's console (live line) when it listens, and to this task's log."""
    print(text, flush=True)
    if _progress is not None:
        with contextlib.suppress(Exception):  # progress is best effort; the preparation goes on
            _progress.put_nowait(text)


def _prepare_train(job: JobConfig, progress) -> dict[str, Any]:
    """The Ray task: :func:`prepare_split` of the train split, mining with :func:`mine_on_cluster`."""
    import ray

    from ce_ray.data.prepare import prepare_split

    global _progress
    _progress = progress
    _say(f"prepare: reading and checking {job.data.describe_train()} on node {ray.get_runtime_context().get_node_id()[:8]}")
    return asdict(prepare_split(job, "train", on_cluster=True))


def prepare_on_cluster(job: JobConfig) -> PreparedSplit:
    """Prepare ``data.train`` as one Ray task off the driver's node (see the module docstring).

    Raises:
        ConfigError / DataError: as the driver path raises them (re-raised here from the task).
        ConfigError: the task wrote the rows to storage this node cannot see (a node-local ``data.cache_dir``).
    """
    import ray
    from ray.exceptions import RayTaskError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from ce_ray.data.prepare import PreparedSplit
    from ce_ray.runtime import ensure_ray

    ensure_ray()
    progress = console.driver_queue()
    node = _preparation_node()
    options: dict[str, Any] = {"num_cpus": 0, "max_retries": 2, "retry_exceptions": False, "name": "ce_ray.prepare_train"}
    if node is not None:  # soft: if that node is lost, the retry goes wherever there is room
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=True)
    task = ray.remote(_prepare_train).options(**options)
    ref = task.remote(job, progress)
    shown = console.active()  # None in the Python API: the task's lines reach the driver's log only

    def show_progress() -> None:
        with contextlib.suppress(Exception):  # progress is best effort
            while not progress.empty():
                text = progress.get_nowait()
                if shown is not None:
                    shown.live(text)

    try:
        while not ray.wait([ref], timeout=0.5)[0]:
            show_progress()
        raw = ray.get(ref)
    except RayTaskError as exc:
        if isinstance(exc.cause, (DataError, ConfigError)):
            raise exc.cause from None
        raise
    finally:
        show_progress()
        if shown is not None:
            shown.end_live()
        with contextlib.suppress(Exception):
            progress.shutdown()
    split = PreparedSplit(**raw)
    if not storage.exists(storage.join(split.uri, "ce_ray_split.json")):
        raise ConfigError(
            f"data.cache_dir: the cluster prepared data.train at {split.uri}, which this node cannot see; with "
            "data.prepare_on: cluster, put run.output_dir or data.cache_dir on storage every node sees (s3://, gs://, "
            "a shared file system)"
        )
    return split


# --------------------------------------------------------------------------------------------
# mining as Ray Data work
# --------------------------------------------------------------------------------------------
class _Encoder:
    """A Ray Data actor: ``data.negatives.model`` loaded once; rows ``{id, text, query}`` -> ``{id, embedding}``."""

    def __init__(self, cfg: NegativesConfig):
        import torch

        from ce_ray.data.mining import load_encoder

        self.model = load_encoder(cfg, "cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = cfg.batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        texts, is_query = list(batch["text"]), batch["query"].astype(bool)
        out = np.zeros((len(texts), self.model.get_sentence_embedding_dimension()), dtype=np.float32)
        for mask, encode in ((is_query, self.model.encode_query), (~is_query, self.model.encode_document)):
            if mask.any():
                out[mask] = encode(
                    [t for t, m in zip(texts, mask) if m], batch_size=self.batch_size, normalize_embeddings=True,
                    convert_to_numpy=True, show_progress_bar=False,
                )  # fmt: skip
        return {"id": batch["id"], "embedding": out}


class _Searcher:
    """A Ray Data actor holding the corpus embeddings once; rows ``{q, row, positives}`` -> ``{q, negatives}``."""

    def __init__(self, embeddings: list, n_corpus: int, cfg: NegativesConfig, range_max: int, max_positives: int):
        import ray

        import torch

        (self.embeddings,) = ray.get(embeddings)  # a list, so Ray hands over the reference, not the array
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.n_corpus = n_corpus
        self.cfg = cfg
        self.range_max, self.max_positives = range_max, max_positives

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from ce_ray.data.mining import select_negatives

        found = select_negatives(
            self.embeddings[batch["row"]], self.embeddings[: self.n_corpus], [list(p) for p in batch["positives"]],
            self.cfg, self.range_max, self.max_positives, list(batch["q"]), device=self.device,
        )  # fmt: skip
        negatives = np.empty(len(found), dtype=object)
        negatives[:] = [np.asarray(ids, dtype=np.int64) for ids in found]
        return {"q": batch["q"], "negatives": negatives}


class _ProgressLine:
    """``prepare: <text>, ETA Ns`` every 10 s and at the end; ``text`` has ``{done}`` and ``{rate}`` fields."""

    def __init__(self, text: str):
        self.text, self.started, self.said = text, time.monotonic(), time.monotonic()

    def update(self, done: int, total: int) -> None:
        if time.monotonic() - self.said > 10 or done == total:
            rate = done / max(time.monotonic() - self.started, 1e-9)
            _say(f"prepare: {self.text.format(done=done, rate=rate)}, ETA {(total - done) / rate:,.0f}s")
            self.said = time.monotonic()


# queries x corpus texts x dimensions per search shard: about 10 s for one CPU actor (4,000 queries against 1M
# texts of 32 dims; 333 against 1M of all-MiniLM-L6-v2's 384)
_SEARCH_SHARD_WORK = 128_000_000_000


def _actors(cfg: NegativesConfig) -> int:
    import ray

    if cfg.concurrency:
        return cfg.concurrency
    resources = ray.cluster_resources()
    if cfg.num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) / cfg.num_gpus))
    return max(1, int(resources.get("CPU", 1)))


def mine_on_cluster(
    pairs_q: list[str], pairs_p: list[str], corpus: list[str] | None, cfg: NegativesConfig, range_max: int
) -> dict[str, list[str]]:
    """{query: its negatives, best first}: ``mine_hard_negatives``' corpus, search and filters as Ray Data work.

    The corpus is the library's: the positives, after ``corpus`` (the other sources' positives), each once;
    queries are searched once each (a query with several positives excludes all of them).
    """
    import numpy as np
    import pyarrow as pa
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    texts = list(dict.fromkeys(list(corpus or ()) + pairs_p))
    at = {t: i for i, t in enumerate(texts)}
    queries = list(dict.fromkeys(pairs_q))
    positives: dict[str, list[int]] = {}
    for q, p in zip(pairs_q, pairs_p):
        ids = positives.setdefault(q, [])
        if at[p] not in ids:
            ids.append(at[p])
    max_positives = max(np.unique(np.asarray(pairs_q, dtype=object), return_counts=True)[1])
    n_corpus, total = len(texts), len(texts) + len(queries)
    actors = _actors(cfg)
    remote = {"num_cpus": 1, "num_gpus": cfg.num_gpus} if cfg.num_gpus > 0 else {"num_cpus": 1}

    # 1. embed the corpus and the queries with an encoder actor pool
    rows = pa.table({"id": np.arange(total), "text": texts + queries, "query": np.arange(total) >= n_corpus})
    block = max(cfg.batch_size, -(-total // (actors * 8)))
    embedded = ray.data.from_arrow([rows.slice(i, block) for i in range(0, total, block)]).map_batches(
        _Encoder, fn_constructor_kwargs={"cfg": cfg},
        batch_size=cfg.batch_size * 4, compute=ray.data.ActorPoolStrategy(size=actors), **remote,
    )  # fmt: skip
    embeddings, done, line = None, 0, _ProgressLine(f"embedded {{done:,}}/{total:,} texts on {actors} actor(s), {{rate:,.0f}} texts/s")
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        if embeddings is None:
            embeddings = np.zeros((total, batch["embedding"].shape[1]), dtype=np.float32)
        embeddings[batch["id"]] = batch["embedding"]
        done += len(batch["id"])
        line.update(done, total)

    # 2. exact top-k search and the filters, queries sharded over actors that each hold the embeddings once
    ref = ray.put(embeddings)
    search = pa.table({
        "q": np.arange(len(queries)), "row": np.arange(n_corpus, total),
        "positives": [positives[q] for q in queries],
    })  # fmt: skip
    # at least 4 shards per actor (the pool balances them), none bigger than _SEARCH_SHARD_WORK (the progress line moves)
    shard = max(1, min(-(-len(queries) // (actors * 4)), -(-_SEARCH_SHARD_WORK // (n_corpus * embeddings.shape[1]))))
    found = ray.data.from_arrow([search.slice(i, shard) for i in range(0, len(queries), shard)]).map_batches(
        _Searcher,
        fn_constructor_kwargs={
            "embeddings": [ref], "n_corpus": n_corpus, "cfg": cfg, "range_max": range_max,
            "max_positives": int(max_positives),
        },
        batch_size=256, compute=ray.data.ActorPoolStrategy(size=actors), **remote,
    )  # fmt: skip
    by_query: dict[str, list[str]] = {}
    line = _ProgressLine(f"searched {{done:,}}/{len(queries):,} queries, {{rate:,.0f}} queries/s")
    for batch in found.iter_batches(batch_size=None, batch_format="numpy"):
        for q, ids in zip(batch["q"], batch["negatives"]):
            by_query[queries[int(q)]] = [texts[i] for i in ids]
        line.update(len(by_query), len(queries))
    del ref
    return by_query
