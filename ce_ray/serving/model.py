"""The model deployment: one replica holding one CrossEncoder, batching requests across callers.

Concurrent calls meet in ``@serve.batch``: the pairs of all requests in a batch are scored together
by :class:`~ce_ray.serving.batching.PairScorer` and split back per request. Settings come from
:class:`~ce_ray.config.ServeConfig`: ``max_batch_requests`` requests per batch (1 turns it off),
``batch_wait_timeout_s`` to fill a batch (a batch runs while the next one queues, so under load
batches fill up by themselves), ``max_batch_size`` pairs and ``max_batch_tokens`` padded tokens per
forward pass; ``num_gpus`` > 0 runs on CUDA; ``backend`` and ``precision`` are resolved by
:mod:`~ce_ray.serving.backends` (torch, ONNX Runtime or OpenVINO; fp16 on GPU, bf16 on CPUs with native bf16);
on CPU the replica uses ``num_cpus`` threads.
"""

import logging
import resource
from dataclasses import dataclass

import numpy as np
from ray import serve

from ce_ray.config import ServeConfig
from ce_ray.modeling import is_remote, read_task, resolve_model_dir
from ce_ray.serving.api import (
    ApiError,
    InfoResponse,
    PredictRequest,
    PredictResponse,
    PredictResult,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ServeStats,
    check_predict,
    check_rerank,
    coerce,
)
from ce_ray.serving.backends import load_model, serving_precision
from ce_ray.serving.batching import PairScorer, score_isolated

__all__ = ["CrossEncoderModel", "served_names"]

logger = logging.getLogger(__name__)


def _raise_failure(scored):
    """The scores of one request, or the error it failed with (raised here, in that request only)."""
    if isinstance(scored, Exception):
        raise scored
    return scored


def served_names(cfg: ServeConfig) -> tuple[str, set[str]]:
    """The model's public name and every name a request may use for it."""
    assert cfg.model is not None
    name = cfg.model_name or cfg.model
    names = {name, cfg.model}
    if not is_remote(cfg.model):  # resolving a remote model would download it here
        try:
            names.add(resolve_model_dir(cfg.model))
        except (FileNotFoundError, ValueError):
            pass
    return name, names


_COUNTERS = (
    "requests",
    "pairs",
    "batches",
    "max_requests_per_batch",
    "forward_passes",
    "mixed_forward_passes",
    "truncated_pairs",
)


@dataclass
class _Job:
    """The pairs of one request, waiting in the batch queue."""

    firsts: list[str]
    seconds: list[str]


@dataclass
class _Scored:
    """The model's output for one request's pairs."""

    logits: np.ndarray  # [pairs, num_labels], float32
    tokens: int
    truncated: int


@serve.deployment(name="CrossEncoderModel")
class CrossEncoderModel:
    """One replica holding one CrossEncoder; ``rerank``, ``predict``, ``info`` and ``health`` are its methods.

    Concurrent calls meet in :meth:`_score_batch` (``@serve.batch``): the pairs of all requests in a
    batch are tokenized in one call, sorted by token length, cut into forward passes of at most
    ``max_batch_size`` pairs and ``max_batch_tokens`` padded tokens, scored with
    ``model(**features).logits`` under ``torch.inference_mode``, put back in order and split per
    request. The activation is the CrossEncoder's own (sigmoid for one output), so scores match
    ``CrossEncoder.rank``/``predict``.

    Raises (at start-up): ValueError for a model that is not a plain sequence-classification
    CrossEncoder, or a GPU replica that sees no CUDA device.
    """

    def __init__(self, cfg: ServeConfig):
        import torch

        self.cfg = cfg
        self.name, self.names = served_names(cfg)
        self.path = resolve_model_dir(cfg.model)
        self.device = "cuda" if cfg.num_gpus > 0 else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("serve.num_gpus > 0 but this replica sees no CUDA device")
        self.precision = serving_precision(cfg, self.device)
        if self.device == "cpu":
            torch.set_num_threads(max(1, round(cfg.num_cpus)))

        ce, net = load_model(cfg, self.path, self.device, self.precision)  # serve.backend: torch, onnx or openvino
        self.activation = ce.activation_fn
        self.max_length = int(ce.max_seq_length or 512)
        # CPU: small passes pad least and cost the same per token; GPU: large passes fill the device.
        self.max_batch_tokens = cfg.max_batch_tokens or (32768 if self.device == "cuda" else 1024)
        self.num_labels = ce.num_labels
        self.scorer = PairScorer(
            ce.tokenizer,
            net,
            self.device,
            self.max_length,
            cfg.max_batch_size,
            self.max_batch_tokens,
            self.num_labels,
            max_query_tokens=cfg.max_query_tokens,
        )
        id2label = getattr(net.config, "id2label", None) or {}
        self.labels = [id2label.get(i, str(i)) for i in range(self.num_labels)] if self.num_labels > 1 else None
        self.task = read_task(self.path) or ("rerank" if self.num_labels == 1 else "nli")

        self._score_batch.set_max_batch_size(cfg.max_batch_requests)
        self._score_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._score([_Job(["warm-up"], ["warm-up"])])  # the first, slow forward pass outside any request
        self._counts = dict.fromkeys(_COUNTERS, 0)

    # -- public methods (also callable through a DeploymentHandle) ---------------------------
    async def rerank(self, request: RerankRequest | dict) -> RerankResponse:
        """Score ``request.documents`` against ``request.query``; results sorted best first."""
        import torch

        request = coerce(RerankRequest, request)
        check_rerank(request, self.cfg, self.names, self.name)
        if self.num_labels != 1:
            raise ApiError(
                400,
                "wrong_model_kind",
                f"model: {self.name!r} is a classifier with {self.num_labels} labels; use POST /predict",
                field="model",
            )
        docs = request.documents
        scored = _raise_failure(await self._score_batch(_Job([request.query] * len(docs), docs)))
        logits = torch.from_numpy(scored.logits)
        scores = (logits if request.raw_scores else self.activation(logits)).reshape(-1).tolist()
        ranked = sorted(range(len(docs)), key=lambda i: scores[i], reverse=True)[: request.top_n]
        return RerankResponse(
            results=[
                RerankResult(index=i, relevance_score=scores[i], document=docs[i] if request.return_documents else None)
                for i in ranked
            ],
            model=self.name,
            usage={"documents": len(docs), "total_tokens": scored.tokens, "truncated_documents": scored.truncated},
        )

    async def predict(self, request: PredictRequest | dict) -> PredictResponse:
        """Label each pair: class probabilities (softmax) for classifiers, the sigmoid score for 1 output."""
        import torch

        request = coerce(PredictRequest, request)
        check_predict(request, self.cfg, self.names, self.name)
        scored = _raise_failure(await self._score_batch(_Job([p[0] for p in request.pairs], [p[1] for p in request.pairs])))
        out = self.activation(torch.from_numpy(scored.logits))
        if self.num_labels == 1:
            results = [PredictResult(score=s) for s in out.reshape(-1).tolist()]
        else:
            probs = torch.softmax(out, dim=1).tolist()
            results = []
            for row in probs:
                best = max(range(len(row)), key=row.__getitem__)
                label, probabilities = self.labels[best], dict(zip(self.labels, row))
                results.append(PredictResult(label=label, label_id=best, score=row[best], probabilities=probabilities))
        return PredictResponse(
            results=results,
            model=self.name,
            usage={"pairs": len(request.pairs), "total_tokens": scored.tokens, "truncated_pairs": scored.truncated},
        )

    def health(self) -> bool:
        """The replica is up, so the model is loaded (Serve routes only to constructed replicas)."""
        return True

    def check_health(self) -> None:
        """Serve's own replica health check: a replica whose model cannot score a pair is restarted."""
        if not np.isfinite(self.scorer.score(["health"], ["check"]).logits).all():
            raise RuntimeError("the model returns non-finite scores")

    def info(self) -> InfoResponse:
        cfg = self.cfg
        return InfoResponse(
            model=self.name,
            model_path=self.path,
            task=self.task,
            num_labels=self.num_labels,
            labels=self.labels,
            max_length=self.max_length,
            device=self.device,
            precision=self.precision,
            backend=getattr(self.scorer.net, "backend", "torch"),
            model_file=getattr(self.scorer.net, "file", None),
            limits={
                "max_documents": cfg.max_documents,
                "max_pairs": cfg.max_pairs,
                "max_text_chars": cfg.max_text_chars,
                "max_batch_size": cfg.max_batch_size,
                "max_batch_tokens": self.max_batch_tokens,
                "max_batch_requests": cfg.max_batch_requests,
                "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
            },
            stats=self.stats(),
        )

    def stats(self) -> ServeStats:
        import torch

        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if self.device == "cuda" else None
        return ServeStats(
            replica=serve.get_replica_context().replica_id.unique_id,
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
        firsts = [text for job in jobs for text in job.firsts]
        seconds = [text for job in jobs for text in job.seconds]
        sizes = [len(job.firsts) for job in jobs]
        owner = np.repeat(np.arange(len(jobs)), sizes)
        scored = self.scorer.score(firsts, seconds, owner=owner, max_owner_tokens=self.cfg.max_request_tokens)

        counts = self._counts
        counts["forward_passes"] += scored.forward_passes
        counts["mixed_forward_passes"] += scored.mixed_forward_passes
        counts["batches"] += 1
        counts["requests"] += len(jobs)
        counts["pairs"] += len(firsts)
        counts["truncated_pairs"] += int(scored.truncated.sum())
        counts["max_requests_per_batch"] = max(counts["max_requests_per_batch"], len(jobs))
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
                        f"body: {scored.over_budget[j]} tokens to score (after truncation), at most "
                        f"{self.cfg.max_request_tokens} (serve.max_request_tokens); send fewer or shorter texts",
                        field="body",
                    )
                )
            elif not np.isfinite(logits).all():  # never send NaN/inf: a server error for this request only
                logger.error("non-finite scores for a request of %d pairs (model %s)", size, self.name)
                out.append(RuntimeError("the model returned non-finite scores"))
            else:
                out.append(_Scored(logits, int(scored.lengths[start:end].sum()), int(scored.truncated[start:end].sum())))
            start = end
        return out
