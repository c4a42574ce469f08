"""The model deployment: replicas holding CrossEncoders, batching requests across callers.

Concurrent calls meet in ``@serve.batch``: the pairs of all requests in a batch are scored together
by :class:`~ce_ray.serving.batching.PairScorer` (per model) and split back per request. Settings come
from :class:`~ce_ray.config.ServeConfig`: ``max_batch_requests`` requests per batch (1 turns it off),
``batch_wait_timeout_s`` to fill a batch (a batch runs while the next one queues, so under load
batches fill up by themselves), ``max_batch_size`` pairs and ``max_batch_tokens`` padded tokens per
forward pass; ``num_gpus`` > 0 runs on CUDA; ``backend`` and ``precision`` are resolved by
:mod:`~ce_ray.serving.backends` (torch, ONNX Runtime or OpenVINO; fp16 on GPU, bf16 on CPUs with native bf16);
on CPU the replica uses ``num_cpus`` threads. With ``serve.models`` a replica loads the models
requests ask for on demand (``@serve.multiplexed``), at most ``max_models_per_replica`` at once.
"""

import asyncio
import logging
import os
import resource
import time
import weakref
from datetime import datetime, timezone
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray
from ray import serve

from ce_ray.config import ServeConfig
from ce_ray.fusion import fused_scores
from ce_ray.modeling import content_hash, read_task, resolve_model_dir
from ce_ray.serving.api import (
    ApiError,
    InfoResponse,
    ModelVersion,
    PredictRequest,
    PredictResponse,
    PredictResult,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ServeStats,
    check_predict,
    check_rerank,
    chunks_per_doc,
    coerce,
)
from ce_ray.serving.backends import load_model as load_backend
from ce_ray.serving.backends import serving_precision
from ce_ray.serving.batching import PairScorer, score_isolated
from ce_ray.serving.catalog import catalog
from ce_ray.serving.metrics import ModelMetrics
from ce_ray.serving.stats import StatsPusher

__all__ = ["CrossEncoderModel", "LoadedModel", "load_model"]

logger = logging.getLogger(__name__)


def _raise_failure(scored):
    """The scores of one request, or the error it failed with (raised here, in that request only)."""
    if isinstance(scored, Exception):
        raise scored
    return scored


_COUNTERS = (
    "requests",
    "pairs",
    "batches",
    "max_requests_per_batch",
    "forward_passes",
    "mixed_forward_passes",
    "truncated_pairs",
)


@dataclass(eq=False)
class LoadedModel:
    """One CrossEncoder ready to score: its scorer, its activation and what /info says of it."""

    name: str
    path: str
    scorer: PairScorer
    activation: Any
    num_labels: int
    labels: list[str] | None
    task: str
    max_length: int
    max_batch_tokens: int
    device: str
    precision: str
    backend: str
    model_file: str | None
    fusion: dict[str, Any] | None = None  # {weight, normalisation, retriever, source[, scales, calibration]} when on
    retriever: Any = None  # the SentenceTransformer fused with it (shared by the replica's models)
    version: ModelVersion | None = None  # content hash of the model dir, and when this replica loaded it
    __weakref__: Any = field(default=None, init=False, repr=False, compare=False)

    def cosines(self, query: str, docs: list[str]) -> np.ndarray:
        """The retriever's cosine of ``query`` with each of ``docs``."""
        vectors = self.retriever.encode([query, *docs], normalize_embeddings=True, convert_to_numpy=True)
        return vectors[1:] @ vectors[0]


_RETRIEVERS: dict[tuple[str, str], Any] = {}  # (name, device) -> SentenceTransformer: loaded once per replica


def fusion_settings(cfg: ServeConfig, path: str) -> dict[str, Any] | None:
    """``serve.fusion`` for the model at ``path``: None (off), or its weight, normalisation and retriever, and the
    fitted scales and calibration where ``ce_ray_quality.json`` has them (:mod:`ce_ray.fusion`; the calibration only
    at the fitted weight). Without scales (a model fitted before them, or one ce-ray never fitted), z-scores over
    each request's documents.

    Raises:
        ValueError: ``auto`` for a model without a fitted weight, or a weight without a known retriever.
    """
    from ce_ray.fusion import NORMALISATION, PER_REQUEST
    from ce_ray.quality import read_model_quality

    if cfg.fusion == "off":
        return None
    fitted = (read_model_quality(path) or {}).get("fusion")
    if cfg.fusion == "auto":
        if not fitted:
            raise ValueError(
                f"serve.fusion: auto, but {os.path.basename(path)} has no fusion weight fitted by ce-ray train/tune "
                "(ce_ray_quality.json); set serve.fusion to a weight in [0, 1], or off"
            )
        weight, source = float(fitted["weight"]), "auto (fitted on the eval rows)"
    else:
        weight, source = float(cfg.fusion), "serve.fusion"
    retriever = cfg.fusion_retriever or (fitted or {}).get("retriever")
    if not retriever:
        raise ValueError(
            f"serve.fusion: {cfg.fusion}: no retriever to fuse {os.path.basename(path)} with; set serve.fusion_retriever "
            "(a SentenceTransformer: hub id, directory or bundled:all-MiniLM-L6-v2)"
        )
    scales = (fitted or {}).get("scales")
    settings = {"weight": weight, "normalisation": NORMALISATION if scales else PER_REQUEST, "retriever": retriever, "source": source}
    if scales:
        settings["scales"] = scales
        if fitted.get("calibration") and weight == float(fitted["weight"]):
            settings["calibration"] = fitted["calibration"]
    return settings


def load_retriever(name: str, device: str) -> Any:
    """The fusion retriever, once per replica process (several served models may share it)."""
    from sentence_transformers import SentenceTransformer

    from ce_ray.modeling import resolve_model_name

    key = (name, device)
    if key not in _RETRIEVERS:
        _RETRIEVERS[key] = SentenceTransformer(resolve_model_name(name), device=device)
    return _RETRIEVERS[key]


def load_model(name: str, location: str, cfg: ServeConfig) -> LoadedModel:
    """Load ``location`` (a model dir or URI) as :class:`LoadedModel`, and run one warm-up pass.

    Raises:
        ValueError: not a plain sequence-classification CrossEncoder, or a GPU replica without CUDA.
    """
    import torch

    path = resolve_model_dir(location)
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("serve.num_gpus > 0 but this replica sees no CUDA device")
    precision = serving_precision(cfg, device)
    ce, net = load_backend(cfg, path, device, precision)  # serve.backend: torch, onnx or openvino
    max_length = int(ce.max_seq_length or 512)
    # CPU: small passes pad least and cost the same per token; GPU: large passes fill the device.
    max_batch_tokens = cfg.max_batch_tokens or (32768 if device == "cuda" else 1024)
    num_labels = ce.num_labels
    scorer = PairScorer(
        ce.tokenizer,
        net,
        device,
        max_length,
        cfg.max_batch_size,
        max_batch_tokens,
        num_labels,
        max_query_tokens=cfg.max_query_tokens,
        overlap=cfg.chunk_overlap_tokens,
    )
    id2label = getattr(net.config, "id2label", None) or {}
    labels = [id2label.get(i, str(i)) for i in range(num_labels)] if num_labels > 1 else None
    task = read_task(path) or ("rerank" if num_labels == 1 else "nli")
    fusion = fusion_settings(cfg, path) if num_labels == 1 else None
    retriever = load_retriever(fusion["retriever"], device) if fusion else None
    scorer.score(["warm-up"], ["warm-up"])  # the first, slow forward pass outside any request
    model = LoadedModel(
        name, path, scorer, ce.activation_fn, num_labels, labels, task, max_length, max_batch_tokens, device, precision,
        getattr(net, "backend", "torch"), getattr(net, "file", None), fusion, retriever,
    )  # fmt: skip
    if retriever is not None:
        model.cosines("warm-up", ["warm-up"])
    model.version = ModelVersion(version=content_hash(path), loaded_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return model


@dataclass
class _Job:
    """The pairs of one request, waiting in the batch queue."""

    model: LoadedModel
    firsts: list[str]
    seconds: list[str]
    chunks: int = 1  # windows a long second text may be split into (1: cut at the model's window)
    doc_tokens: int = 0  # > 0: each second text is cut to this many tokens first
    queued_at: float = field(default_factory=time.perf_counter)


@dataclass
class _Scored:
    """The model's output for one request's pairs."""

    logits: np.ndarray  # [pairs, num_labels], float32
    tokens: int
    truncated: int
    chunks: int | None = None  # windows scored, when some pair was chunked


@serve.deployment(name="CrossEncoderModel")
class CrossEncoderModel:
    """One replica holding the app's CrossEncoder(s); ``rerank``, ``predict``, ``info`` and ``health`` are its methods.

    Concurrent calls meet in :meth:`_score_batch` (``@serve.batch``): the pairs of all requests in a
    batch are tokenized in one call per model, sorted by token length, cut into forward passes of at
    most ``max_batch_size`` pairs and ``max_batch_tokens`` padded tokens, scored with
    ``model(**features).logits`` under ``torch.inference_mode``, put back in order and split per
    request. The activation is the CrossEncoder's own (sigmoid for one output), so scores match
    ``CrossEncoder.rank``/``predict``.

    Raises (at start-up): ValueError for a model that is not a plain sequence-classification
    CrossEncoder, or a GPU replica that sees no CUDA device.
    """

    def __init__(self, cfg: ServeConfig):
        import torch

        self.cfg = cfg
        self.catalog = catalog(cfg)
        if cfg.num_gpus == 0:
            torch.set_num_threads(max(1, round(cfg.num_cpus)))
        self._loaded: weakref.WeakValueDictionary[str, LoadedModel] = weakref.WeakValueDictionary()
        self._single: LoadedModel | None = None
        if self.catalog.multiplexed:
            # Serve's model multiplexing, wired at start-up so that the LRU bound comes from the config.
            async def load(name: str) -> LoadedModel:
                loop = asyncio.get_running_loop()
                model = await loop.run_in_executor(None, load_model, name, self.catalog.locations[name], cfg)
                self._loaded[name] = model
                return model

            self._multiplexed = serve.multiplexed(max_num_models_per_replica=cfg.max_models_per_replica)(load)
        else:
            self._single = load_model(self.catalog.default, self.catalog.locations[self.catalog.default], cfg)
            self._loaded[self._single.name] = self._single

        self._score_batch.set_max_batch_size(cfg.max_batch_requests)
        self._score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._metrics = ModelMetrics()
        context = serve.get_replica_context()
        self._replica = context.replica_id.unique_id
        self._node = ray.get_runtime_context().get_node_id()
        self._pusher = StatsPusher(context.app_name, self._replica, lambda: self.stats().model_dump())

    def __del__(self):
        """Serve calls this when it stops the replica (scale-down, redeploy): leave the stats board."""
        pusher = getattr(self, "_pusher", None)
        if pusher is not None:
            pusher.close()

    async def _model(self, name: str) -> LoadedModel:
        if self._single is not None:
            return self._single
        return await self._multiplexed(name)

    # -- public methods (also callable through a DeploymentHandle) ---------------------------
    async def rerank(self, request: RerankRequest | dict) -> RerankResponse:
        """Score ``request.documents`` against ``request.query``; results sorted best first."""
        import torch

        request = coerce(RerankRequest, request)
        model = await self._model(check_rerank(request, self.cfg, self.catalog))
        if model.num_labels != 1:
            raise ApiError(
                400,
                "wrong_model_kind",
                f"model: {model.name!r} is a classifier with {model.num_labels} labels; use POST /predict",
                field="model",
            )
        docs = request.documents
        chunks = chunks_per_doc(request, self.cfg)[0]
        job = _Job(model, [request.query] * len(docs), docs, chunks, request.max_tokens_per_doc or 0)
        scored = _raise_failure(await self._score_batch(job))
        if model.fusion is not None:  # serve.fusion: the reranker's logits with the retriever's cosines
            loop = asyncio.get_running_loop()
            cosines = await loop.run_in_executor(None, model.cosines, request.query, docs)
            logits = torch.from_numpy(fused_scores(
                scored.logits.reshape(-1), cosines, model.fusion["weight"], model.fusion.get("scales"),
                model.fusion.get("calibration"),
            ))
            scores = (logits if request.raw_scores else torch.sigmoid(logits)).tolist()
        else:
            logits = torch.from_numpy(scored.logits)
            scores = (logits if request.raw_scores else model.activation(logits)).reshape(-1).tolist()
        ranked = sorted(range(len(docs)), key=lambda i: scores[i], reverse=True)[: request.top_n]
        return RerankResponse(
            results=[
                RerankResult(index=i, relevance_score=scores[i], document=docs[i] if request.return_documents else None)
                for i in ranked
            ],
            model=model.name,
            usage={
                "documents": len(docs), "total_tokens": scored.tokens, "truncated_documents": scored.truncated,
                "chunks": scored.chunks,
            },
        )  # fmt: skip

    async def predict(self, request: PredictRequest | dict) -> PredictResponse:
        """Label each pair: class probabilities (softmax) for classifiers, the sigmoid score for 1 output."""
        import torch

        request = coerce(PredictRequest, request)
        model = await self._model(check_predict(request, self.cfg, self.catalog))
        pairs = request.pairs
        scored = _raise_failure(await self._score_batch(_Job(model, [p[0] for p in pairs], [p[1] for p in pairs])))
        out = model.activation(torch.from_numpy(scored.logits))
        if model.num_labels == 1:
            results = [PredictResult(score=s) for s in out.reshape(-1).tolist()]
        else:
            probs = torch.softmax(out, dim=1).tolist()
            results = []
            for row in probs:
                best = max(range(len(row)), key=row.__getitem__)
                label, probabilities = model.labels[best], dict(zip(model.labels, row))
                results.append(PredictResult(label=label, label_id=best, score=row[best], probabilities=probabilities))
        return PredictResponse(
            results=results,
            model=model.name,
            usage={"pairs": len(pairs), "total_tokens": scored.tokens, "truncated_pairs": scored.truncated},
        )

    def health(self) -> bool:
        """The replica is up, so its model is loaded (Serve routes only to constructed replicas)."""
        return True

    def check_health(self) -> None:
        """Serve's own replica health check: a replica whose model cannot score a pair is restarted."""
        for model in list(self._loaded.values()):
            if not np.isfinite(model.scorer.score(["health"], ["check"]).logits).all():
                raise RuntimeError(f"model {model.name!r} returns non-finite scores")

    async def info(self, name: str | None = None) -> InfoResponse:
        """What ``name`` (default: the app's default model) is, and this replica's counters."""
        cfg = self.cfg
        model = await self._model(name or self.catalog.default)
        return InfoResponse(
            model=model.name,
            model_path=model.path,
            task=model.task,
            version=model.version,
            num_labels=model.num_labels,
            labels=model.labels,
            max_length=model.max_length,
            device=model.device,
            precision=model.precision,
            backend=model.backend,
            model_file=model.model_file,
            fusion=model.fusion,
            limits={
                "max_documents": cfg.max_documents,
                "max_pairs": cfg.max_pairs,
                "max_text_chars": cfg.max_text_chars,
                "max_request_tokens": cfg.max_request_tokens,
                "long_documents": cfg.long_documents,
                "max_chunks_per_doc": cfg.max_chunks_per_doc,
                "chunk_overlap_tokens": cfg.chunk_overlap_tokens,
                "max_batch_size": cfg.max_batch_size,
                "max_batch_tokens": model.max_batch_tokens,
                "max_batch_requests": cfg.max_batch_requests,
                "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
                "max_models_per_replica": cfg.max_models_per_replica if self.catalog.multiplexed else 1,
            },
            replicas=[self.stats()],
        )

    def stats(self) -> ServeStats:
        import torch

        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if self.cfg.num_gpus > 0 else None
        return ServeStats(
            replica=self._replica,
            node_id=self._node,
            pid=os.getpid(),
            models=sorted(self._loaded.keys()),
            versions={name: m.version for name, m in list(self._loaded.items()) if m.version is not None},
            peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            peak_gpu_mb=peak_gpu,
            **self._counts,
        )

    # -- batching ------------------------------------------------------------------------------
    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)  # both reset from the config in __init__
    async def _score_batch(self, jobs: list[_Job]) -> list[_Scored | Exception]:
        # Runs the model on this replica's event loop on purpose: requests that arrive meanwhile
        # queue up and form the next batch, so batches grow with the load. One request that fails the
        # merged batch (a text the tokenizer rejects...) is split out: the others are scored without it.
        return score_isolated(self._score, jobs)

    def _score(self, jobs: list[_Job]) -> list[_Scored | Exception]:
        """Score ``jobs`` (each model's jobs together) and update the counters and metrics."""
        started = time.perf_counter()
        for job in jobs:
            self._metrics.queue_wait.observe(started - job.queued_at)
        by_model: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            by_model.setdefault(id(job.model), []).append(i)
        out: list[_Scored | Exception] = [None] * len(jobs)  # type: ignore[list-item]
        for indices in by_model.values():
            for i, result in zip(indices, self._score_one_model([jobs[i] for i in indices])):
                out[i] = result
        pairs = sum(len(job.firsts) for job in jobs)
        counts = self._counts
        counts["batches"] += 1
        counts["requests"] += len(jobs)
        counts["pairs"] += pairs
        counts["max_requests_per_batch"] = max(counts["max_requests_per_batch"], len(jobs))
        self._metrics.batch_requests.observe(len(jobs))
        self._metrics.batch_pairs.observe(pairs)
        self._metrics.forward.observe(time.perf_counter() - started)
        return out

    def _score_one_model(self, jobs: list[_Job]) -> list[_Scored | Exception]:
        model = jobs[0].model
        firsts = [text for job in jobs for text in job.firsts]
        seconds = [text for job in jobs for text in job.seconds]
        sizes = [len(job.firsts) for job in jobs]
        owner = np.repeat(np.arange(len(jobs)), sizes)
        chunks = np.repeat([job.chunks for job in jobs], sizes)
        doc_tokens = np.repeat([job.doc_tokens for job in jobs], sizes)
        scored = model.scorer.score(
            firsts, seconds, owner=owner, max_owner_tokens=self.cfg.max_request_tokens, chunks=chunks, doc_tokens=doc_tokens
        )

        truncated = int(scored.truncated.sum())
        self._counts["forward_passes"] += scored.forward_passes
        self._counts["mixed_forward_passes"] += scored.mixed_forward_passes
        self._counts["truncated_pairs"] += truncated
        self._metrics.pairs.inc(len(firsts), tags={"model": model.name})
        if truncated:
            self._metrics.truncated.inc(truncated, tags={"model": model.name})
        out: list[_Scored | Exception] = []
        start = 0
        for j, size in enumerate(sizes):
            end = start + size
            logits = scored.logits[start:end]
            if j in scored.over_budget:
                out.append(
                    ApiError(
                        413,
                        "too_large",
                        f"body: {scored.over_budget[j]} tokens to score (after truncation, every chunk of a long document counted), at most "
                        f"{self.cfg.max_request_tokens} (serve.max_request_tokens); send fewer or shorter texts",
                        field="body",
                    )
                )
            elif not np.isfinite(logits).all():  # never send NaN/inf: a server error for this request only
                logger.error("non-finite scores for a request of %d pairs (model %s)", size, model.name)
                out.append(RuntimeError("the model returned non-finite scores"))
            else:
                windows = None if scored.chunks is None or jobs[j].chunks == 1 else int(scored.chunks[start:end].sum())
                out.append(_Scored(logits, int(scored.lengths[start:end].sum()), int(scored.truncated[start:end].sum()), windows))
            start = end
        return out
