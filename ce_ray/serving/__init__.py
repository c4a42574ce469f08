"""Serve a CrossEncoder over HTTP with Ray Serve: ``POST /rerank``, ``POST /predict``, ``GET /health``, ``GET /info``.

=============  =============================================================================
module         what it holds
=============  =============================================================================
``app``        build, start, update (roll a new model out, roll back) and stop the application
``ingress``    the FastAPI routes: validation, API key, every error mapped to JSON
``health``     ``GET /health`` from an app of its own, so that a burst on the API cannot delay it
``model``      the model deployment: the CrossEncoder(s) of a replica, batching across requests
``catalog``    the models an app serves, their names and where they load from
``batching``   token-budget forward passes over length-sorted pairs
``api``        request and response models, limits (the HTTP contract)
``stats``      every replica's counters in one place, for ``GET /info``
``metrics``    Prometheus metrics through ``ray.serve.metrics``
=============  =============================================================================

``serve run ce_ray.serving:app_builder`` (or ``jobs/serve.yaml``) runs the same app with Ray's CLI.
"""

from ce_ray.serving.app import (
    API_KEY_ENV,
    APP_NAME,
    app_builder,
    health_builder,
    metrics_url,
    quality_warning,
    serve_forever,
    start_server,
    stop_server,
    update_server,
    wait_until_ready,
)

__all__ = [
    "API_KEY_ENV",
    "APP_NAME",
    "app_builder",
    "health_builder",
    "metrics_url",
    "quality_warning",
    "serve_forever",
    "start_server",
    "stop_server",
    "update_server",
    "wait_until_ready",
]
