"""The HTTP ingress: FastAPI routes in front of the model deployment; validation, auth and errors in one place.

Routes: ``POST /rerank`` (Cohere/Infinity shape), ``POST /predict``, ``GET /health``, ``GET /info``;
OpenAPI docs at ``/docs``. Requests are validated against :mod:`ce_ray.serving.api` here, before
they reach a replica (the model validates again, for callers that use its handle directly). With an
API key every route but /health and /docs needs ``Authorization: Bearer <key>`` (401 otherwise).

Errors: bad input is a 4xx with ``{"error": {type, message, field}}`` (422 invalid field, 400 body not
JSON, 413 over a limit, 404 unknown model, 401 bad key); an overloaded replica gives 503.
"""

import asyncio
import hmac
import logging
import time

from fastapi import Depends, FastAPI, Request
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
    ErrorResponse,
    HealthResponse,
    InfoResponse,
    PredictRequest,
    PredictResponse,
    RerankRequest,
    RerankResponse,
    check_predict,
    check_rerank,
    coerce,
    field_name,
)
from ce_ray.serving.model import served_names

__all__ = ["CrossEncoderAPI", "app", "require_api_key"]

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
_HEALTH_FRESH_S = 10.0  # a model answer this recent proves health (a busy replica answers health calls late)


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
        self.name, self.names = served_names(cfg)
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
        request = coerce(RerankRequest, request)
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
        request = coerce(PredictRequest, request)
        check_predict(request, self.cfg, self.names, self.name)
        return await self._call(self.model.predict, request)

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}}, tags=["ops"])
    async def health(self):
        """200 once a model replica is up (model loaded), else 503. Needs no API key."""
        if time.monotonic() - self._last_answer > _HEALTH_FRESH_S:
            try:
                await asyncio.wait_for(self._await(self.model.health.remote()), HEALTH_TIMEOUT_S)
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


