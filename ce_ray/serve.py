"""Serve a CrossEncoder over HTTP with Ray Serve: ``POST /rerank``, ``POST /predict``, ``GET /health``, ``GET /info``.

Run it::

    ce-ray serve --model runs/rerank-tune/best          # a model dir, or a train/tune output_dir (best/, final/)
    ce-ray serve jobs/serve.yaml --set serve.num_gpus=0.5
    serve run jobs/serve.yaml                           # Ray's CLI, same app (see the file's header)

Call it (OpenAPI docs at ``http://127.0.0.1:8000/docs``)::

    curl -s 127.0.0.1:8000/rerank -H 'content-type: application/json' \\
        -d '{"query": "How many people live in Berlin?", "documents": ["Berlin has 3.5M people.", "Paris"], "top_n": 1}'
    curl -s 127.0.0.1:8000/predict -H 'content-type: application/json' -d '{"pairs": [["A man eats", "Someone eats"]]}'

From inside the cluster (another deployment, a Ray task), skip HTTP and call the app's handle. Its methods
take a request model or a dict, return the response model, and raise :class:`~ce_ray.api.ApiError` for
bad input; there is no API key on this path::

    handle = serve.get_app_handle("ce-ray")
    response = await handle.rerank.remote({"query": "...", "documents": ["...", "..."]})  # a RerankResponse
    labels = handle.predict.remote({"pairs": [["premise", "hypothesis"]]}).result()    # from sync code

An app is two deployments. :class:`CrossEncoderModel` holds the model: it merges the pairs of concurrent
requests into one batch, tokenizes them once, sorts them by length, pads per forward pass (bounded by
pairs and by padded tokens), and splits the scores back. :class:`CrossEncoderAPI` is the FastAPI ingress:
validation against the models in :mod:`ce_ray.api`, limits, the API key, and every error mapped to JSON
in one place. Both read their settings from :class:`~ce_ray.config.ServeConfig`:

* Cross-request batching: ``max_batch_requests`` requests per batch (1 turns it off) and
  ``batch_wait_timeout_s`` to fill a batch. A batch runs while the next one queues, so under load
  batches fill up by themselves; at low load the wait adds at most the timeout.
* Forward passes: at most ``max_batch_size`` pairs and ``max_batch_tokens`` padded tokens. Sorting the
  merged pairs by length and cutting by tokens is where batching pays on CPU: 20 QA documents padded to
  the longest one waste over half the compute; length-sorted passes over many requests waste little
  (bench/serve_load.py).
* Device and precision: ``num_gpus`` > 0 runs on CUDA; ``precision: auto`` is fp16 on GPU, fp32 on CPU.
  On CPU the replica uses ``num_cpus`` torch threads.
* Scale: ``num_replicas`` (or ``auto`` with ``min_replicas``/``max_replicas``/``target_ongoing_requests``),
  fractional ``num_cpus``/``num_gpus`` per replica, ``max_concurrent_requests`` per replica before 503.
* API key: ``api_key`` or the ``CE_RAY_API_KEY`` environment variable; then every route but /health and
  /docs needs ``Authorization: Bearer <key>`` (401 otherwise).
* Binds to ``host`` (127.0.0.1 unless told otherwise) and ``port``.

Errors: bad input is a 4xx with ``{"error": {type, message, field}}`` (422 invalid field, 400 body not
JSON, 413 over a limit, 404 unknown model, 401 bad key); an overloaded replica gives 503. Texts longer
than the model's max length are truncated and counted in ``usage``.
"""

import asyncio
import hmac
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.serve import Application
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ce_ray.api import (
    ApiError,
    ErrorResponse,
    HealthResponse,
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
    field_name,
)
from ce_ray.config import ConfigError, ServeConfig, load_job

__all__ = [
    "API_KEY_ENV",
    "APP_NAME",
    "CrossEncoderAPI",
    "CrossEncoderModel",
    "app_builder",
    "serve_forever",
    "start_server",
    "stop_server",
    "wait_until_ready",
]

logger = logging.getLogger(__name__)

API_KEY_ENV = "CE_RAY_API_KEY"
APP_NAME = "ce-ray"
_HEALTH_TIMEOUT_S = 5.0
_HEALTH_FRESH_S = 10.0  # a model answer this recent proves health (a busy replica answers health calls late)


def _is_remote(path: str) -> bool:
    from ce_ray import storage

    return "://" in path and not storage.is_local(path)


def _served_names(cfg: ServeConfig) -> tuple[str, set[str]]:
    """The model's public name and every name a request may use for it."""
    from ce_ray.modeling import resolve_model_dir

    assert cfg.model is not None
    name = cfg.model_name or cfg.model
    names = {name, cfg.model}
    if not _is_remote(cfg.model):  # resolving a remote model would download it here
        try:
            names.add(resolve_model_dir(cfg.model))
        except (FileNotFoundError, ValueError):
            pass
    return name, names


def _coerce(model_cls, value):
    """A request model from a request model or a dict (handle callers may pass either)."""
    if isinstance(value, model_cls):
        return value
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = field_name(first["loc"])
        raise ApiError(422, "invalid_request", f"{field}: {first['msg']}", field=field) from None


# --------------------------------------------------------------------------------------------
# [1] the model deployment: batching across requests
# --------------------------------------------------------------------------------------------
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
        from sentence_transformers.base.modules import Transformer
        from sentence_transformers.cross_encoder import CrossEncoder

        from ce_ray.modeling import read_task, resolve_model_dir

        self.cfg = cfg
        self.name, self.names = _served_names(cfg)
        self.path = resolve_model_dir(cfg.model)
        self.device = "cuda" if cfg.num_gpus > 0 else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("serve.num_gpus > 0 but this replica sees no CUDA device")
        self.precision = cfg.precision if cfg.precision != "auto" else ("fp16" if self.device == "cuda" else "fp32")
        if self.device == "cpu":
            torch.set_num_threads(max(1, round(cfg.num_cpus)))

        ce = CrossEncoder(self.path, device=self.device)
        plain = len(ce) == 1 and isinstance(ce[0], Transformer)
        if not plain or ce[0].transformer_task != "sequence-classification":
            raise ValueError(
                f"{self.path}: ce-ray serves sequence-classification CrossEncoders (one Transformer module); "
                f"this model has modules {[type(m).__name__ for m in ce]}"
            )
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.precision]
        self.net = ce.model.to(dtype).eval()
        self.tokenizer = ce.tokenizer
        wanted = ("input_ids", "attention_mask", "token_type_ids")
        self.input_names = [n for n in self.tokenizer.model_input_names if n in wanted]
        self.activation = ce.activation_fn
        self.max_length = int(ce.max_seq_length or 512)
        # CPU: small passes pad least and cost the same per token; GPU: large passes fill the device.
        self.max_batch_tokens = cfg.max_batch_tokens or (32768 if self.device == "cuda" else 1024)
        self.num_labels = ce.num_labels
        id2label = getattr(self.net.config, "id2label", None) or {}
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

        request = _coerce(RerankRequest, request)
        check_rerank(request, self.cfg, self.names, self.name)
        if self.num_labels != 1:
            raise ApiError(
                400,
                "wrong_model_kind",
                f"model: {self.name!r} is a classifier with {self.num_labels} labels; use POST /predict",
                field="model",
            )
        docs = request.documents
        scored = await self._score_batch(_Job([request.query] * len(docs), docs))
        scores = self.activation(torch.from_numpy(scored.logits)).reshape(-1).tolist()
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

        request = _coerce(PredictRequest, request)
        check_predict(request, self.cfg, self.names, self.name)
        scored = await self._score_batch(_Job([p[0] for p in request.pairs], [p[1] for p in request.pairs]))
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
    async def _score_batch(self, jobs: list[_Job]) -> list[_Scored]:
        # Runs the model on this replica's event loop on purpose: requests that arrive meanwhile
        # queue up and form the next batch, so batches grow with the load.
        return self._score(jobs)

    def _score(self, jobs: list[_Job]) -> list[_Scored]:
        import torch

        firsts = [text for job in jobs for text in job.firsts]
        seconds = [text for job in jobs for text in job.seconds]
        sizes = [len(job.firsts) for job in jobs]
        owner = np.repeat(np.arange(len(jobs)), sizes)

        # Tokenize every pair once, unpadded; sort by length so each chunk pads little.
        enc = self.tokenizer(firsts, seconds, truncation="longest_first", max_length=self.max_length)
        lengths = np.array([len(ids) for ids in enc["input_ids"]])
        if enc.encodings is not None:  # fast tokenizers keep what truncation cut off
            truncated = np.array([bool(e.overflowing) for e in enc.encodings])
        else:  # slow tokenizers: a pair at the limit counts as truncated
            truncated = lengths >= self.max_length
        order = np.argsort(-lengths, kind="stable")

        logits = np.empty((len(firsts), self.num_labels), dtype=np.float32)
        with torch.inference_mode():
            for idx in _chunks(order, lengths, self.cfg.max_batch_size, self.max_batch_tokens):
                features = self.tokenizer.pad(
                    {name: [enc[name][i] for i in idx] for name in self.input_names},
                    return_tensors="pt",
                    pad_to_multiple_of=8 if self.device == "cuda" else None,
                )
                features = {k: v.to(self.device) for k, v in features.items()}
                logits[idx] = self.net(**features).logits.float().cpu().numpy()
                self._counts["forward_passes"] += 1
                self._counts["mixed_forward_passes"] += int(len(np.unique(owner[idx])) > 1)

        counts = self._counts
        counts["batches"] += 1
        counts["requests"] += len(jobs)
        counts["pairs"] += len(firsts)
        counts["truncated_pairs"] += int(truncated.sum())
        counts["max_requests_per_batch"] = max(counts["max_requests_per_batch"], len(jobs))
        out, start = [], 0
        for size in sizes:
            end = start + size
            out.append(_Scored(logits[start:end], int(lengths[start:end].sum()), int(truncated[start:end].sum())))
            start = end
        return out


def _chunks(order: np.ndarray, lengths: np.ndarray, max_pairs: int, max_tokens: int) -> list[np.ndarray]:
    """Split pair indices, sorted longest first, into forward passes of at most ``max_pairs`` pairs and
    ``max_tokens`` padded tokens (each pass pads to its first, longest pair)."""
    out, start = [], 0
    while start < len(order):
        size = max(1, min(max_pairs, max_tokens // int(lengths[order[start]])))
        out.append(order[start : start + size])
        start += size
    return out


# --------------------------------------------------------------------------------------------
# [2] the FastAPI ingress: validation, auth, errors in one place
# --------------------------------------------------------------------------------------------
app = FastAPI(
    title="ce-ray",
    summary="Rerank documents and classify text pairs with a sentence-transformers CrossEncoder.",
    version="1",
)
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 503)}
_bearer = HTTPBearer(auto_error=False, description="The server's API key (only when it was started with one).")


def _error(status_code: int, type: str, message: str, field: str | None = None, **extra) -> JSONResponse:
    detail = {"type": type, "message": message, "field": field, **extra}
    return JSONResponse({"error": detail}, status_code=status_code)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    response = _error(exc.status_code, exc.type, exc.message, exc.field)
    response.headers.update(exc.headers or {})
    return response


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return _error(400, "invalid_json", "body: not valid JSON", "body")
    fields = [{"field": field_name(e["loc"]), "message": e["msg"].removeprefix("Value error, ")} for e in errors]
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    return _error(422, "invalid_request", message, fields[0]["field"], errors=fields)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    types = {404: "not_found", 405: "method_not_allowed"}
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    return _error(exc.status_code, types.get(exc.status_code, "http_error"), message)


@app.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error on %s", request.url.path, exc_info=exc)
    return _error(500, "internal_error", "internal error; see the server log")


async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """FastAPI dependency: 401 unless the request carries the server's key (when it has one)."""
    expected = serve.get_replica_context().servable_object.api_key
    if expected is None:
        return
    given = credentials.credentials if credentials is not None else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise ApiError(
            401,
            "unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            field="authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )


@serve.deployment(name="CrossEncoderAPI", ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class CrossEncoderAPI:
    """HTTP routes in front of :class:`CrossEncoderModel` (the handle ``model``)."""

    def __init__(self, model: DeploymentHandle, cfg: ServeConfig):
        self.model = model
        self.cfg = cfg
        self.api_key = cfg.api_key
        self.name, self.names = _served_names(cfg)
        self._last_answer = float("-inf")  # monotonic time of the model's latest answer

    async def _call(self, method, request):
        """Call the model; anything but an :class:`ApiError` becomes a 503/500 without its text."""
        try:
            result = await method.remote(request)
        except ApiError:
            self._last_answer = time.monotonic()
            raise
        except BackPressureError:
            raise ApiError(503, "overloaded", "the model is busy; retry later", headers={"Retry-After": "1"}) from None
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError):
            logger.exception("model replica unavailable")
            raise ApiError(503, "unavailable", "the model is not available; retry later") from None
        except Exception:
            logger.exception("model call failed")
            raise ApiError(500, "internal_error", "the model failed on this request; see the server log") from None
        self._last_answer = time.monotonic()
        return result

    @app.post(
        "/rerank",
        response_model=RerankResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        dependencies=[Depends(require_api_key)],
        tags=["rerank"],
        response_description="Documents sorted by relevance, best first.",
    )
    async def rerank(self, request: RerankRequest) -> RerankResponse:
        """Rank documents for a query (Cohere/Infinity shape).

        Scores equal `CrossEncoder.rank` on the same inputs. Pairs longer than the model's max
        length are truncated and counted in `usage.truncated_documents`.
        """
        request = _coerce(RerankRequest, request)
        check_rerank(request, self.cfg, self.names, self.name)
        return await self._call(self.model.rerank, request)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=_ERRORS,
        dependencies=[Depends(require_api_key)],
        tags=["classify"],
        response_description="One result per pair, in request order.",
    )
    async def predict(self, request: PredictRequest) -> PredictResponse:
        """Classify text pairs (NLI: premise, hypothesis) with the model's label names."""
        request = _coerce(PredictRequest, request)
        check_predict(request, self.cfg, self.names, self.name)
        return await self._call(self.model.predict, request)

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, tags=["ops"])
    async def health(self):
        """200 once a model replica is up (model loaded), else 503. Needs no API key."""
        if time.monotonic() - self._last_answer > _HEALTH_FRESH_S:
            try:
                await asyncio.wait_for(self._await(self.model.health.remote()), _HEALTH_TIMEOUT_S)
            except Exception:
                return JSONResponse({"status": "unavailable", "model": self.name}, status_code=503)
            self._last_answer = time.monotonic()
        return HealthResponse(status="ok", model=self.name)

    @app.get(
        "/info", response_model=InfoResponse, responses=_ERRORS, dependencies=[Depends(require_api_key)], tags=["ops"]
    )
    async def info(self) -> InfoResponse:
        """The model, its task and max length, the limits, and batching counters of one replica."""
        try:
            return await self.model.info.remote()
        except Exception:
            logger.exception("model info failed")
            raise ApiError(503, "unavailable", "the model is not available") from None

    @staticmethod
    async def _await(response):
        return await response


# --------------------------------------------------------------------------------------------
# [3] the application, and starting/stopping it
# --------------------------------------------------------------------------------------------
def _replica_options(cfg: ServeConfig) -> dict:
    if cfg.num_replicas == "auto":
        scale = {
            "autoscaling_config": {
                "min_replicas": cfg.min_replicas,
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
            }
        }
    else:
        scale = {"num_replicas": cfg.num_replicas}
    return {**scale, "max_ongoing_requests": cfg.max_concurrent_requests}


def _check_model_path(cfg: ServeConfig) -> None:
    from ce_ray.modeling import is_model_dir, resolve_model_dir

    if not cfg.model:
        raise ConfigError("serve.model: required; a CrossEncoder directory or a train/tune output_dir (--model DIR)")
    if _is_remote(cfg.model):  # the replicas download it; here only check that it is there
        from ce_ray import storage

        if not any(storage.exists(storage.join(cfg.model, *sub, "config.json")) for sub in ((), ("best",), ("final",))):
            raise ConfigError(f"serve.model: {cfg.model} holds no model (config.json), nor best/ or final/ with one")
        return
    try:
        path = resolve_model_dir(cfg.model)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"serve.model: {exc}") from None
    looks_local = os.path.isabs(cfg.model) or cfg.model.startswith((".", "~")) or os.path.exists(cfg.model)
    if looks_local and not is_model_dir(path):
        raise ConfigError(f"serve.model: {cfg.model} is not a model directory (config.json and weights)")


def quality_warning(model: str) -> str | None:
    """The warning of a model ce-ray trained that ranks worse than its retriever baseline, or None.

    Read from the model's own ``ce_ray_quality.json`` (written by ``ce-ray train``/``tune``).
    """
    from ce_ray import storage
    from ce_ray.baseline import QUALITY_FILE, read_model_quality
    from ce_ray.modeling import resolve_model_dir

    if _is_remote(model):
        found = [storage.join(model, *sub, QUALITY_FILE) for sub in ((), ("best",), ("final",))]
        found = [uri for uri in found if storage.exists(uri)]
        quality = storage.read_json(found[0]) if found else None
    else:
        try:
            quality = read_model_quality(resolve_model_dir(model))
        except (FileNotFoundError, ValueError):
            return None
    verdict = (quality or {}).get("verdict")
    if not verdict or verdict.get("beats", True):
        return None
    return f"{model}: {verdict['message']}"


def app_builder(args: ServeConfig) -> Application:
    """The Serve application for ``args`` (a :class:`ServeConfig` or a dict of its fields).

    Ray's typed app builder: ``serve run jobs/serve.yaml`` passes the YAML's ``args`` here and
    Ray validates them into a :class:`ServeConfig`. The API key falls back to ``CE_RAY_API_KEY``
    (read where the app is built). ``host``/``port`` are not app settings: ``start_server`` passes
    them to ``serve.start``; with ``serve run`` they come from the config's ``http_options``.

    Raises:
        ConfigError: an unknown or invalid field, or ``model`` missing or not a model directory.
    """
    if not isinstance(args, ServeConfig):
        args = load_job(base={"task": "rerank", "serve": dict(args)}).serve
    cfg = args.model_copy(update={"api_key": args.api_key or os.environ.get(API_KEY_ENV) or None})
    _check_model_path(cfg)
    model = CrossEncoderModel.options(
        **_replica_options(cfg), ray_actor_options={"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    ).bind(cfg)
    return CrossEncoderAPI.options(
        **_replica_options(cfg), max_queued_requests=cfg.max_concurrent_requests
    ).bind(model, cfg)


def start_server(
    cfg: ServeConfig, name: str = APP_NAME, *, wait: bool = True, access_log: bool = True, timeout_s: float = 180.0
) -> str:
    """Deploy the app on Ray Serve (starting Ray and Serve as needed); return its base URL.

    Non-blocking: the server keeps running after this returns, until :func:`stop_server`. Serve's
    HTTP host and port are cluster-wide: if Serve already runs, its address is kept (and returned).

    Args:
        cfg: the serve section of a job.
        name: Serve application name; several apps (e.g. a reranker and an NLI model) can run side by
            side under different ``cfg.route_prefix``.
        wait: wait until GET /health answers 200. With ``wait=False`` start several apps, then call
            :func:`wait_until_ready` for each: their replicas start in parallel.
        access_log: log every request in the replica logs.
        timeout_s: how long to wait for the app to become healthy.

    Raises:
        ConfigError: see :func:`app_builder`.
        RuntimeError: the app failed to deploy (e.g. the model does not load) or never got healthy.

    Example::

        url = start_server(ServeConfig(model="runs/rerank-tune/best", port=8000))
        httpx.post(f"{url}/rerank", json={"query": "q", "documents": ["a", "b"]}).json()
        stop_server()
    """
    from ce_ray.runtime import ensure_ray

    application = app_builder(cfg)  # validates before touching Ray
    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    target = serve.RunTarget(
        target=application, name=name, route_prefix=cfg.route_prefix, logging_config={"enable_access_log": access_log}
    )
    serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    url = _base_url(cfg)
    if wait:
        wait_until_ready(url, name, timeout_s)
    return url


def wait_until_ready(url: str, name: str = APP_NAME, timeout_s: float = 180.0) -> None:
    """Block until ``{url}/health`` answers 200; raise RuntimeError if app ``name`` fails to deploy or times out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:  # replicas start and the proxy learns the route asynchronously: poll readiness, bounded
        status = serve.status().applications.get(name)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve app {name!r} failed to deploy:\n{status.message}")
        try:
            if httpx.get(f"{url}/health", timeout=_HEALTH_TIMEOUT_S + 1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/health did not answer 200 within {timeout_s:.0f}s")
        time.sleep(0.25)


def _base_url(cfg: ServeConfig) -> str:
    host, port = cfg.host, cfg.port
    try:  # the address Serve really uses (it keeps the first one it was started with)
        from ray.serve.context import _get_global_client

        http = _get_global_client().http_config
        host, port = http.host, http.port
    except Exception:
        pass
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    prefix = cfg.route_prefix.rstrip("/")
    return f"http://{host}:{port}{prefix}"


def stop_server(name: str | None = None) -> None:
    """Delete app ``name`` (Serve stays up while other apps run); without a name, shut Serve down."""
    if name is not None:
        serve.delete(name)
        if serve.status().applications:
            return
    serve.shutdown()


def serve_forever(cfg: ServeConfig) -> None:
    """``ce-ray serve``: start the server, print its URL, block until Ctrl-C (or SIGTERM), shut down."""

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    warning = quality_warning(cfg.model) if cfg.model else None
    if warning:
        print(warning, file=sys.stderr, flush=True)
    url = start_server(cfg)
    print(f"serving {cfg.model_name or cfg.model} at {url}  (API docs: {url}/docs; Ctrl-C to stop)", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_server(APP_NAME)
