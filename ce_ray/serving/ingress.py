"""The HTTP ingress: FastAPI routes in front of the model deployment; validation, auth and errors in one place.

Routes: ``POST /rerank`` (Cohere/Infinity shape), ``POST /predict``, ``GET /health``, ``GET /info``;
OpenAPI docs at ``/docs``. Requests are validated against :mod:`ce_ray.serving.api` here, before
they reach a replica (the model validates again, for callers that use its handle directly). With an
API key every route but /health and /docs needs ``Authorization: Bearer <key>`` (401 otherwise).

Errors: bad input is a 4xx with ``{"error": {type, message, field}}`` (422 invalid field, 400 body not
JSON or nested deeper than :data:`MAX_JSON_DEPTH`, 415 a body whose Content-Type is not JSON, 413 over a
limit, 404 unknown model, 401 bad key); an overloaded replica gives 503.
"""

import asyncio
import logging
import time

import numpy as np
from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from ce_ray.config import ServeConfig
from ce_ray.serving.api import (
    ApiError,
    TeiRerankRequest,
    TeiRerankResult,
    CohereRerankRequest,
    CohereRerankResponse,
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    ModelVersion,
    PredictRequest,
    PredictResponse,
    RerankRequest,
    RerankResponse,
    ServedModel,
    ServeStats,
    ServeTotals,
    check_predict,
    check_rerank,
    chunks_per_doc,
    coerce,
    field_name,
    key_ok,
)
from ce_ray.serving.catalog import catalog
from ce_ray.serving.metrics import IngressMetrics, route_label
from ce_ray.serving.stats import board_for

__all__ = ["CrossEncoderAPI", "app", "require_api_key"]

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
_HEALTH_FRESH_S = 10.0  # a model answer this recent proves health (a busy replica answers health calls late)


app = FastAPI(
    title="ce-ray",
    summary="Rerank documents and classify text pairs with a sentence-transformers CrossEncoder.",
    version="1",
)
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 415, 422, 503)}
_bearer = HTTPBearer(auto_error=False, description="The server's API key (only when it was started with one).")


def _error(status_code: int, type: str, message: str, field: str | None = None, **extra) -> JSONResponse:
    detail = {"type": type, "message": message, "field": field, **extra}
    return JSONResponse({"error": detail}, status_code=status_code)


@app.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    response = _error(exc.status_code, exc.type, exc.message, exc.field)
    response.headers.update(exc.headers or {})
    return response


MAX_LISTED_ERRORS = 5
_MAX_MESSAGE_CHARS = 300


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming the fields; at most MAX_LISTED_ERRORS of them, each message cut (no echo of long values)."""
    errors = exc.errors()
    if any(e["type"] == "json_invalid" for e in errors):
        return _error(400, "invalid_json", "body: not valid JSON", "body")
    fields = [
        {"field": field_name(e["loc"])[:100], "message": e["msg"].removeprefix("Value error, ")[:_MAX_MESSAGE_CHARS]}
        for e in errors[:MAX_LISTED_ERRORS]
    ]
    more = f" (and {len(errors) - MAX_LISTED_ERRORS} more)" if len(errors) > MAX_LISTED_ERRORS else ""
    message = "; ".join(f"{f['field']}: {f['message']}" for f in fields) + more
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


_UNAUTHORIZED = ApiError(
    401,
    "unauthorized",
    "missing or wrong API key: send 'Authorization: Bearer <key>'",
    field="authorization",
    headers={"WWW-Authenticate": "Bearer"},
)


async def require_api_key(credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """FastAPI dependency: 401 unless the request carries the server's key (when it has one).

    :class:`RequestGuard` has already refused such requests before their body was read; this keeps each
    route's own contract (and the OpenAPI security scheme) explicit.
    """
    expected = serve.get_replica_context().servable_object.api_key
    given = f"Bearer {credentials.credentials}" if credentials is not None else None
    if not key_ok(expected, given):
        raise _UNAUTHORIZED


# What every scoring route shares: the key, the documented errors, no null fields in answers.
_SCORING_ROUTE = {"response_model_exclude_none": True, "responses": _ERRORS, "dependencies": [Depends(require_api_key)]}

_OPEN_PATHS = ("/health",)
_DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


async def _json_body(request: Request):
    """The request's JSON; an empty body is a missing body (422), bad JSON is 400, as FastAPI's own parsing does."""
    import json

    raw = await request.body()
    if not raw.strip():
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        return json.loads(raw)
    except ValueError:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", 0), "msg": "JSON decode error"}]) from None


def _validated(model_cls, body):
    """``body`` validated as ``model_cls``; errors become the same 422 every route gives."""
    from pydantic import ValidationError

    try:
        return model_cls.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


MAX_JSON_DEPTH = 64  # arrays/objects nested deeper than this are refused before any parser sees the body
_BODY_METHODS = ("POST", "PUT", "PATCH")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``body`` nests arrays/objects more than ``limit`` levels deep (brackets inside strings don't count).

    Linear in the body and done in C (bytes methods, one numpy cumsum), without recursion or regex
    backtracking: ``\\\\`` then ``\\"`` escapes are dropped, the quotes left delimit the strings, and the
    brackets outside them give the depth. A body that is not valid JSON may be over-counted; it would fail to
    parse anyway.
    """
    if body.count(b"[") + body.count(b"{") <= limit:  # the usual case: too few brackets to nest that deep
        return False
    outside = b"".join(body.replace(b"\\\\", b"").replace(b'\\"', b"").split(b'"')[::2])
    brackets = np.frombuffer(outside.translate(None, _NOT_BRACKETS), dtype=np.uint8)
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return bool(steps.size) and int(steps.cumsum().max()) > limit


def _json_content_type(value: str) -> bool:
    """A request body's Content-Type is JSON: ``application/json`` or ``application/*+json`` (as FastAPI reads it)."""
    media = value.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


class RequestGuard:
    """Pure ASGI middleware: the API key, then the body's type, size, pace and depth, before any parsing or
    model work.

    - the key is checked from the headers, before one byte of the body is read (401);
      ``/health`` is open, the docs are open only with ``serve.docs_public``;
    - a body whose ``Content-Type`` is not JSON (``text/plain``, a form...) is refused from the headers, and
      one without a ``Content-Type`` once it is read (415; an empty one is a missing body, 422);
    - ``Content-Length`` over ``serve.max_body_bytes`` is refused at once, and a body (chunked or
      lying about its length) that grows past it is refused while it streams in (413);
    - a body whose next part does not come within ``serve.body_timeout_s`` is refused (408);
    - a body nested more than :data:`MAX_JSON_DEPTH` levels deep is refused before it is parsed (400): JSON
      parsers recurse once per level.

    The body, at most ``max_body_bytes``, is then handed to the app as it came.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = serve.get_replica_context().servable_object
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        route = path[len(root) :] if root and path.startswith(root) else path
        route = "/" + route.strip("/")
        status = 500  # a request that ends without an answer (the client left) counts as a failure

        async def counted_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        started = time.perf_counter()
        try:
            return await self._guarded(api, route, scope, receive, counted_send)
        finally:
            label = route_label(route)
            api.metrics.requests.inc(tags={"route": label, "status": str(status)})
            api.metrics.latency.observe(time.perf_counter() - started, tags={"route": label})

    async def _guarded(self, api, route: str, scope, receive, send):
        cfg: ServeConfig = api.cfg
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        is_open = route in _OPEN_PATHS or (route in _DOCS_PATHS and api.docs_public)
        if not is_open and not key_ok(api.api_key, headers.get("authorization")):
            return await _api_error_response(_UNAUTHORIZED, scope, receive, send)
        has_body = scope.get("method") in _BODY_METHODS
        content_type = headers.get("content-type")
        if has_body and content_type is not None and not _json_content_type(content_type):
            return await _api_error_response(_not_json(content_type), scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > cfg.max_body_bytes):
            return await _api_error_response(_body_too_large(cfg, declared), scope, receive, send)
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), cfg.body_timeout_s)
            except TimeoutError:
                error = ApiError(408, "timeout", f"body: no data for {cfg.body_timeout_s:g} s (serve.body_timeout_s)", field="body")
                return await _api_error_response(error, scope, receive, send)
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > cfg.max_body_bytes:
                return await _api_error_response(_body_too_large(cfg, None), scope, receive, send)
            if not message.get("more_body", False):
                break
        if has_body and content_type is None and body.strip():  # an empty body stays a missing body (422)
            return await _api_error_response(_not_json(None), scope, receive, send)
        if has_body and json_too_deep(bytes(body)):
            error = ApiError(
                400,
                "invalid_json",
                f"body: JSON nested more than {MAX_JSON_DEPTH} levels deep (arrays or objects); flatten it",
                field="body",
            )
            return await _api_error_response(error, scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as the server would say it

        return await self.app(scope, replay, send)


def _not_json(content_type: str | None) -> ApiError:
    given = "missing" if content_type is None else f"{content_type[:100]!r} is not JSON"
    return ApiError(
        415,
        "unsupported_media_type",
        f"content-type: {given}; send the body as JSON with 'Content-Type: application/json'",
        field="content-type",
    )


def _body_too_large(cfg: ServeConfig, declared: str | None) -> ApiError:
    size = f"{declared} bytes" if declared and declared.isdigit() else "more bytes than allowed"
    return ApiError(413, "too_large", f"body: {size}, at most {cfg.max_body_bytes} (serve.max_body_bytes)", field="body")


async def _api_error_response(exc: ApiError, scope, receive, send) -> None:
    response = _error(exc.status_code, exc.type, exc.message, exc.field)
    response.headers.update(exc.headers or {})
    response.headers["connection"] = "close"  # the unread body, if any, goes with the connection
    await response(scope, receive, send)


app.add_middleware(RequestGuard)


def _versions(replicas: list[ServeStats], name: str) -> list[ModelVersion]:
    """The versions of model ``name`` that ``replicas`` serve, each with its replica count, oldest load first."""
    live: dict[str, ModelVersion] = {}
    for r in replicas:
        v = r.versions.get(name)
        if v is None:
            continue
        seen = live.setdefault(v.version, v.model_copy(update={"replicas": 0}))
        seen.replicas += 1
        seen.loaded_at = min(seen.loaded_at, v.loaded_at)
    return sorted(live.values(), key=lambda v: v.loaded_at)


@serve.deployment(name="CrossEncoderAPI", ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class CrossEncoderAPI:
    """HTTP routes in front of :class:`CrossEncoderModel` (the handle ``model``)."""

    def __init__(self, model: DeploymentHandle, cfg: ServeConfig, previous: ServeConfig | None = None):
        self.model = model
        self.cfg = cfg
        self.previous = previous  # the settings this app ran before its latest update (for a rollback)
        self.api_key = cfg.api_key
        self.docs_public = cfg.docs_public if cfg.docs_public is not None else cfg.api_key is None
        self.catalog = catalog(cfg)
        self.metrics = IngressMetrics()
        self.app_name = serve.get_replica_context().app_name
        self._last_answer = float("-inf")  # monotonic time of the model's latest answer

    def _handle(self, name: str) -> DeploymentHandle:
        """The model handle for model ``name`` (with several models, Serve routes to a replica holding it)."""
        return self.model.options(multiplexed_model_id=name) if self.catalog.multiplexed else self.model

    def settings(self) -> tuple[ServeConfig, ServeConfig | None]:
        """The app's settings and those it ran before its latest update (handle callers only: no HTTP route, as
        they hold the API key and the models' paths)."""
        return self.cfg, self.previous

    async def _call(self, method: str, name: str, request, route: str):
        """Call ``method`` of model ``name``; anything but an :class:`ApiError` becomes a 503/500 without its text.

        Counts the request's pairs by route and outcome (``ce_ray_request_pairs_total``).
        """
        pairs = len(request.documents) if method == "rerank" else len(request.pairs)
        status = 500
        try:
            result = await self._call_model(method, name, request, route)
            status = 200
            return result
        except ApiError as exc:
            status = exc.status_code
            raise
        finally:
            self.metrics.pairs.inc(pairs, tags={"route": route, "status": str(status)})

    async def _call_model(self, method: str, name: str, request, route: str):
        try:
            call = getattr(self._handle(name), method).remote(request)
            result = await asyncio.wait_for(self._await(call), self.cfg.request_timeout_s)
        except TimeoutError:
            logger.warning("a request passed its deadline of %.0f s (serve.request_timeout_s)", self.cfg.request_timeout_s)
            self.metrics.shed.inc(tags={"route": route, "reason": "deadline"})
            raise ApiError(
                504, "timeout", f"the request took longer than {self.cfg.request_timeout_s:g} s; retry later",
                headers={"Retry-After": "1"},
            ) from None
        except ApiError:
            self._last_answer = time.monotonic()
            raise
        except BackPressureError:
            self.metrics.shed.inc(tags={"route": route, "reason": "busy"})
            raise ApiError(503, "overloaded", "the model is busy; retry later", headers={"Retry-After": "1"}) from None
        except (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError):
            logger.exception("model replica unavailable")  # e.g. its process died; Serve starts a new one
            self.metrics.shed.inc(tags={"route": route, "reason": "unavailable"})
            raise ApiError(
                503, "unavailable", "the model is not available; retry later", headers={"Retry-After": "1"}
            ) from None
        except Exception:
            logger.exception("model call failed")
            raise ApiError(500, "internal_error", "the model failed on this request; see the server log") from None
        self._last_answer = time.monotonic()
        return result

    @app.post(
        "/rerank",
        response_model=RerankResponse | list[TeiRerankResult],
        **_SCORING_ROUTE,
        tags=["rerank"],
        response_description="Documents sorted by relevance, best first.",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {"anyOf": [RerankRequest.model_json_schema(), TeiRerankRequest.model_json_schema()]}
                    }
                },
            }
        },
    )
    async def rerank(self, request: Request):
        """Rank documents for a query: ce-ray's (Cohere/Infinity) shape, or TEI's when the body has ``texts``.

        Scores equal `CrossEncoder.rank` on the same inputs with `serve.backend: torch` in fp32; the CPU default
        (OpenVINO, bf16 where native) differs by bf16 rounding. Pairs longer than the model's max
        length are truncated and counted in `usage.truncated_documents`.
        """
        if isinstance(request, Request):  # HTTP
            body = await _json_body(request)
            if isinstance(body, dict) and "texts" in body:
                return await self._tei(_validated(TeiRerankRequest, body))
            rerank = _validated(RerankRequest, body)
        else:  # a handle caller: a RerankRequest or a dict; errors as ApiError
            rerank = coerce(RerankRequest, request)
        name = check_rerank(rerank, self.cfg, self.catalog)
        return await self._call("rerank", name, rerank, "/rerank")

    async def _tei(self, request: TeiRerankRequest) -> list[TeiRerankResult]:
        rerank = request.to_rerank()
        name = check_rerank(rerank, self.cfg, self.catalog)
        answer: RerankResponse = await self._call("rerank", name, rerank, "/rerank")
        if not request.truncate and answer.usage.truncated_documents:
            raise ApiError(
                413,
                "too_large",
                f"texts: {answer.usage.truncated_documents} pair(s) longer than the model's max length and truncate "
                "is false; send shorter texts or truncate: true",
                field="texts",
            )
        return [TeiRerankResult(index=r.index, score=r.relevance_score, text=r.document) for r in answer.results]

    async def _cohere(self, request: CohereRerankRequest, version: str, response: Response) -> CohereRerankResponse:
        unsupported = request.unsupported_fields()
        if unsupported:
            raise ApiError(
                422,
                "unsupported_field",
                f"{unsupported[0]}: not supported by this server ({', '.join(unsupported)} would change the "
                "scores); leave it out",
                field=unsupported[0],
            )
        ignored = request.ignored_fields()
        if ignored:
            response.headers["X-Ignored-Fields"] = ",".join(ignored)[:500]
        rerank = request.to_rerank()  # object documents rendered for rank_fields; 422 naming a bad one
        name = check_rerank(rerank, self.cfg, self.catalog)
        answer = await self._call("rerank", name, rerank, f"/v{version}/rerank")
        documents = request.documents if request.return_documents and version == "1" else None  # v2 returns none
        warning = chunks_per_doc(rerank, self.cfg)[1]
        return CohereRerankResponse.of(answer, version, documents, [warning] if warning else None)

    @app.post(
        "/v1/rerank",
        response_model=CohereRerankResponse,
        **_SCORING_ROUTE,
        tags=["rerank"],
    )
    async def cohere_v1(self, request: CohereRerankRequest, response: Response) -> CohereRerankResponse:
        """Cohere's v1 rerank (``cohere.Client(base_url=...).rerank``): documents as texts, ``{text, ...}`` objects,
        or objects ranked on ``rank_fields`` (their ``key: value`` lines); ``return_documents`` gives each as sent."""
        return await self._cohere(request, "1", response)

    @app.post(
        "/v2/rerank",
        response_model=CohereRerankResponse,
        **_SCORING_ROUTE,
        tags=["rerank"],
    )
    async def cohere_v2(self, request: CohereRerankRequest, response: Response) -> CohereRerankResponse:
        """Cohere's v2 rerank (``cohere.ClientV2(base_url=...).rerank``); ``rank_fields`` and object documents as in v1."""
        return await self._cohere(request, "2", response)

    @app.post(
        "/predict",
        response_model=PredictResponse,
        **_SCORING_ROUTE,
        tags=["classify"],
        response_description="One result per pair, in request order.",
    )
    async def predict(self, request: PredictRequest) -> PredictResponse:
        """Classify text pairs (NLI: premise, hypothesis) with the model's label names."""
        request = coerce(PredictRequest, request)
        name = check_predict(request, self.cfg, self.catalog)
        return await self._call("predict", name, request, "/predict")

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, tags=["ops"])
    async def health(self, request: Request):
        """200 once a model replica is up (model loaded), else 503. Needs no API key; without it, the
        answer is only the status (the model's name needs the key). Over HTTP, the app's health app
        (:mod:`ce_ray.serving.health`) answers this path when it is deployed; this route answers without it."""
        name = self.catalog.default if key_ok(self.api_key, request.headers.get("authorization")) else None
        if time.monotonic() - self._last_answer > _HEALTH_FRESH_S:
            try:
                await asyncio.wait_for(self._await(self.model.health.remote()), HEALTH_TIMEOUT_S)
            except BackPressureError:
                pass  # the model's queue is full: it is up and busy
            except Exception:
                return JSONResponse({"status": "unavailable", **({"model": name} if name else {})}, status_code=503)
            self._last_answer = time.monotonic()
        return HealthResponse(status="ok", model=name)

    @app.get(
        "/info", response_model=InfoResponse, responses=_ERRORS, dependencies=[Depends(require_api_key)], tags=["ops"]
    )
    async def info(self, model: str | None = None) -> InfoResponse:
        """The model (the default, or ``?model=NAME``): its task, max length and limits; every model the app
        serves (by name; their paths only on a server with an API key); every live replica's counters (each at
        most about 1 s old) and their totals."""
        name = self.catalog.resolve(model)
        if name is None:
            raise ApiError(404, "model_not_found", f"model: {model[:100]!r} is not served here", field="model")
        try:
            answer: InfoResponse = await self._handle(name).info.remote(name)
        except Exception:
            logger.exception("model info failed")
            raise ApiError(503, "unavailable", "the model is not available", headers={"Retry-After": "1"}) from None
        try:  # the other replicas' counters; without the board (its node lost, restarting) just this one's
            board = board_for(self.app_name)
            replicas = [ServeStats.model_validate(r) for r in await board.read.remote()] if board else []
        except Exception:
            logger.warning("replica stats board unavailable; /info lists the answering replica only", exc_info=True)
            replicas = []
        # The replica that answered is exact now; the others as of their last push (or not yet pushed).
        (answering,) = answer.replicas
        replicas = [r for r in replicas if r.replica != answering.replica] + [answering]
        replicas.sort(key=lambda r: r.replica)
        loaded = [m for r in replicas for m in r.models]
        # Where models live only for a caller with the key: with one, /info needs it; without one, anyone may ask.
        paths = self.api_key is not None
        models = [
            ServedModel(
                name=n, path=path if paths else None, default=n == self.catalog.default, loaded_on=loaded.count(n),
                versions=_versions(replicas, n),
            )
            for n, path in self.catalog.locations.items()
        ]  # fmt: skip
        update = {"models": models, "replicas": replicas, "totals": ServeTotals.of(replicas)}
        return answer.model_copy(update=update if paths else {**update, "model_path": None})

    @staticmethod
    async def _await(response):
        return await response


