"""``GET /health`` from an application of its own, so that a burst on the API cannot delay it.

Ray Serve does work for every request inside the ingress replica before the app's code runs: it looks up
the proxy and fetches the request's messages from it. So a ``/health`` answered by the ingress waits
behind every request that arrived just before it. 200 requests arriving at once delayed it by 0.3-0.7 s
on 2 CPUs (bench/README, "A hostile client"). This application's one replica serves nothing else. The
answer comes from Serve's own view of the API application: each of its deployments (ingress, model) has
a replica RUNNING, or is healthy while scaled to zero. That view reflects every model replica's
``check_health``. It is read at most once a second.

:func:`~ce_ray.serving.app.start_server` deploys it next to the API app as ``<app>-health`` at
``<route_prefix>/health`` (Serve routes a path to the longest matching prefix). A Serve config file adds
it as a second application (``jobs/serve.yaml``). Without it, the ingress's own ``/health`` answers.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ce_ray.config import ServeConfig
from ce_ray.serving.api import HealthResponse, key_ok
from ce_ray.serving.catalog import catalog

__all__ = ["HEALTH_SUFFIX", "Health", "health_prefix"]

logger = logging.getLogger(__name__)

HEALTH_SUFFIX = "-health"  # the health app of API app "ce-ray" is "ce-ray-health"
_FRESH_S = 1.0  # how long one look at Serve's status is reused
_SERVING = ("HEALTHY", "UPSCALING", "DOWNSCALING")  # deployment statuses that serve (with 0 replicas too)


def health_prefix(route_prefix: str) -> str:
    """The health app's route: ``/health`` under the API app's own prefix."""
    return route_prefix.rstrip("/") + "/health"


@serve.deployment(name="Health", num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class Health:
    """``GET /health``: 200 ``{"status": "ok"}`` while the API app serves, else 503 ``{"status": "unavailable"}``;
    with the API key, the answer names the default model, as the ingress's own ``/health`` does."""

    def __init__(self, cfg: ServeConfig):
        self.api_key = cfg.api_key
        self.model_name = catalog(cfg).default
        self.app = serve.get_replica_context().app_name.removesuffix(HEALTH_SUFFIX)
        self._looked_at = float("-inf")
        self._serving = False

    async def __call__(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            error = {"type": "method_not_allowed", "message": "Method Not Allowed", "field": None}
            return JSONResponse({"error": error}, status_code=405, headers={"Allow": "GET, HEAD"})
        name = self.model_name if key_ok(self.api_key, request.headers.get("authorization")) else None
        serving = await self._api_serving()
        answer = HealthResponse(status="ok" if serving else "unavailable", model=name)
        return JSONResponse(answer.model_dump(exclude_none=not serving), status_code=200 if serving else 503)

    async def _api_serving(self) -> bool:
        if time.monotonic() - self._looked_at > _FRESH_S:
            self._serving = await asyncio.to_thread(self._look)
            self._looked_at = time.monotonic()
        return self._serving

    def _look(self) -> bool:
        try:
            app = serve.status().applications.get(self.app)
        except Exception:
            logger.warning("could not read Serve's status of app %r", self.app, exc_info=True)
            return False
        if app is None or not app.deployments:
            return False
        return all(
            d.replica_states.get("RUNNING", 0) > 0 or (d.status in _SERVING and not d.replica_states)
            for d in app.deployments.values()
        )
