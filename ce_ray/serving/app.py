"""The Serve application: build it from a :class:`~ce_ray.config.ServeConfig`, start it, stop it.

Run it::

    ce-ray serve --model runs/rerank-tune/best          # a model dir, or a train/tune output_dir (best/, final/)
    ce-ray serve jobs/serve.yaml --set serve.num_gpus=0.5
    serve run jobs/serve.yaml                           # Ray's CLI, same app (see the file's header)

Call it (OpenAPI docs at ``http://127.0.0.1:8000/docs``)::

    curl -s 127.0.0.1:8000/rerank -H 'content-type: application/json' \\
        -d '{"query": "How many people live in Berlin?", "documents": ["Berlin has 3.5M people.", "Paris"], "top_n": 1}'
    curl -s 127.0.0.1:8000/predict -H 'content-type: application/json' -d '{"pairs": [["A man eats", "Someone eats"]]}'

From inside the cluster (another deployment, a Ray task), skip HTTP and call the app's handle. Its methods
take a request model or a dict, return the response model, and raise :class:`~ce_ray.serving.api.ApiError`
for bad input; there is no API key on this path::

    handle = serve.get_app_handle("ce-ray")
    response = await handle.rerank.remote({"query": "...", "documents": ["...", "..."]})  # a RerankResponse
    labels = handle.predict.remote({"pairs": [["premise", "hypothesis"]]}).result()    # from sync code

An app is two deployments: :class:`~ce_ray.serving.model.CrossEncoderModel` (the model, batching) and
:class:`~ce_ray.serving.ingress.CrossEncoderAPI` (the FastAPI ingress); ``GET /health`` is a small app of its
own beside it (:mod:`ce_ray.serving.health`). Scale with ``num_replicas`` (or
``auto`` with ``min_replicas``/``max_replicas``/``target_ongoing_requests``), fractional
``num_cpus``/``num_gpus`` per replica, ``max_concurrent_requests`` per replica before 503. The API key is
``api_key`` or the ``CE_RAY_API_KEY`` environment variable. Binds to ``host`` (127.0.0.1 unless told
otherwise) and ``port``.
"""

import os
import signal
import sys
import threading
import time

from ray import serve
from ray.serve import Application

from ce_ray import storage
from ce_ray.config import ConfigError, ServeConfig, load_job
from ce_ray.modeling import is_model_dir, is_remote, locate_model
from ce_ray.quality import QUALITY_FILE
from ce_ray.serving.backends import check_backend
from ce_ray.serving.catalog import catalog
from ce_ray.serving.health import HEALTH_SUFFIX, Health, health_prefix
from ce_ray.serving.ingress import HEALTH_TIMEOUT_S, CrossEncoderAPI
from ce_ray.serving.model import CrossEncoderModel, fusion_settings
from ce_ray.workarounds.uvicorn_157 import ENV as HEADER_TIMEOUT_ENV

__all__ = [
    "API_KEY_ENV",
    "APP_NAME",
    "api_key",
    "app_builder",
    "exposure_warning",
    "metrics_url",
    "quality_warning",
    "serve_forever",
    "start_server",
    "stop_server",
    "update_server",
    "wait_until_ready",
]

API_KEY_ENV = "CE_RAY_API_KEY"
APP_NAME = "ce-ray"
# How often a replica that Serve stops checks whether it still holds requests (Serve's default: every 2 s). An idle
# replica exits at its first check, so deletes, scale-downs and updates finish this much sooner.
DRAIN_CHECK_S = 0.25


def _replica_options(cfg: ServeConfig) -> dict:
    """The model deployment's Serve options: replicas (or autoscaling), placement, queue bounds, draining."""
    if cfg.num_replicas == "auto":
        scale = {
            "autoscaling_config": {
                "min_replicas": cfg.min_replicas,
                "max_replicas": cfg.max_replicas,
                "target_ongoing_requests": cfg.target_ongoing_requests,
                "upscale_delay_s": cfg.upscale_delay_s,
                "downscale_delay_s": cfg.downscale_delay_s,
                "look_back_period_s": cfg.look_back_period_s,
            }
        }
    else:
        scale = {"num_replicas": cfg.num_replicas}
    if cfg.max_replicas_per_node is not None:
        scale["max_replicas_per_node"] = cfg.max_replicas_per_node
    return {
        **scale,
        "max_ongoing_requests": cfg.max_concurrent_requests,
        "max_queued_requests": cfg.max_queued_requests,
        # A replica Serve stops (scale-down, redeploy) first finishes what it holds, up to the request deadline.
        "graceful_shutdown_timeout_s": cfg.request_timeout_s + 5,
        "graceful_shutdown_wait_loop_s": DRAIN_CHECK_S,
        # An update starts new replicas and lets them pass health before old ones stop (Serve's surge rollout).
        "max_surge_percent": cfg.max_surge_percent,
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
    }


def _check_model_path(cfg: ServeConfig) -> None:
    """``serve.model`` (or each of ``serve.models``) holds a model (a remote one is only looked at here: the
    replicas download it)."""
    if not cfg.model and not cfg.models:
        raise ConfigError(
            "serve.model: required; a CrossEncoder directory or a train/tune output_dir (--model DIR), "
            "or several as serve.models (--model NAME=DIR ...)"
        )
    where = {"serve.model": cfg.model} if cfg.model else {f"serve.models.{n}": m for n, m in cfg.models.items()}
    for key, model in where.items():
        try:
            path = locate_model(model)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"{key}: {exc}") from None
        looks_local = os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)
        if not is_remote(path) and looks_local and not is_model_dir(path):
            raise ConfigError(f"{key}: {model} is not a model directory (config.json and weights)")
        check_backend(cfg, model)
        if cfg.fusion != "off" and not is_remote(path) and os.path.isdir(path):  # remote: the replica checks
            try:
                fusion_settings(cfg, path)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None


def quality_warning(model: str) -> str | None:
    """The warning of a model ce-ray trained that ranks worse than its retriever baseline, or None.

    Read from the model's own ``ce_ray_quality.json`` (written by ``ce-ray train``/``tune``).
    """
    try:
        uri = storage.join(storage.current(locate_model(model)), QUALITY_FILE)
    except (FileNotFoundError, ValueError):
        return None
    quality = storage.read_json(uri) if storage.exists(uri) else None
    verdict = (quality or {}).get("verdict")
    if not verdict or verdict.get("beats", True):
        return None
    return f"{model}: {verdict['message']}"


def api_key(cfg: ServeConfig) -> str | None:
    """``serve.api_key``, else ``CE_RAY_API_KEY``; an empty one (e.g. an unset shell variable) is refused."""
    if cfg.api_key is not None:
        return cfg.api_key
    value = os.environ.get(API_KEY_ENV)
    if value is not None and not value.strip():
        raise ConfigError(
            f"serve.api_key: {API_KEY_ENV} is set but empty, which would serve without authentication; "
            f"set a real key or unset {API_KEY_ENV}"
        )
    return value


def exposure_warning(cfg: ServeConfig) -> str | None:
    """A warning for a server bound beyond this machine without an API key, or None."""
    import ipaddress

    host = cfg.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback or api_key(cfg):
        return None
    return (
        f"WARNING: serving on {cfg.host}:{cfg.port} without an API key: anyone who can reach this address can use "
        f"the model. Set {API_KEY_ENV} (or serve.api_key), or bind to 127.0.0.1."
    )


def app_builder(args: ServeConfig) -> Application:
    """The Serve application for ``args`` (a :class:`ServeConfig` or a dict of its fields).

    Ray's typed app builder: ``serve run jobs/serve.yaml`` passes the YAML's ``args`` here and
    Ray validates them into a :class:`ServeConfig`. The API key falls back to ``CE_RAY_API_KEY``
    (read where the app is built). ``host``/``port`` are not app settings: ``start_server`` passes
    them to ``serve.start``; with ``serve run`` they come from the config's ``http_options``.

    Raises:
        ConfigError: an unknown or invalid field, or ``model`` missing or not a model directory.
    """
    cfg = _config(args)
    _check_model_path(cfg)
    return _application(cfg)


def _application(cfg: ServeConfig, previous: ServeConfig | None = None) -> Application:
    """The app's two deployments for a checked ``cfg``; ``previous``: the settings an update replaces."""
    model = CrossEncoderModel.options(**_replica_options(cfg)).bind(cfg)
    # The ingress only awaits the model: it holds many requests cheaply, so that shedding happens at the
    # models' bounded queues and every refused request still gets the app's JSON 503.
    replicas = cfg.max_replicas if cfg.num_replicas == "auto" else cfg.num_replicas
    held = replicas * (cfg.max_concurrent_requests + cfg.max_queued_requests)
    ingress = {
        "num_replicas": cfg.ingress_replicas,
        "max_ongoing_requests": 4 * held + 100,
        # An ingress replica Serve stops (an update) answers what it holds first: each request within its deadline.
        "graceful_shutdown_timeout_s": cfg.request_timeout_s + 5,
        "graceful_shutdown_wait_loop_s": DRAIN_CHECK_S,
        "max_surge_percent": 100,  # 0 CPUs: the new ingress always fits beside the old one
    }
    return CrossEncoderAPI.options(**ingress, max_queued_requests=-1).bind(model, cfg, previous)  # -1: "no limit"


def health_builder(args: ServeConfig) -> Application:
    """The app answering ``GET /health`` for API app ``<name>`` (:mod:`ce_ray.serving.health`); deploy it as
    ``<name>-health`` at ``<route_prefix>/health``, with the same ``args`` as :func:`app_builder`."""
    # 0 CPUs: an update starts the new one first
    return Health.options(max_surge_percent=100, graceful_shutdown_wait_loop_s=DRAIN_CHECK_S).bind(_config(args))


def _config(args: ServeConfig | dict) -> ServeConfig:
    """A builder's args (a :class:`ServeConfig`, or a Serve config file's dict) validated, with the API key."""
    if not isinstance(args, ServeConfig):
        args = load_job(base={"task": "rerank", "serve": dict(args)}).serve
    return args.model_copy(update={"api_key": api_key(args)})


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
    import ray

    if not ray.is_initialized():  # read by the Serve proxies of the Ray that ensure_ray starts here
        os.environ[HEADER_TIMEOUT_ENV] = str(cfg.header_timeout_s)
    ensure_ray()
    # Ray's proxy stops a request 5 s after the app's own deadline (the app answers a JSON 504 first).
    # Idle keep-alive connections close after 5 s (uvicorn's own default; Ray's is 90 s).
    http = {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s + 5, "keep_alive_timeout_s": 5}
    serve.start(http_options=http, proxy_location=cfg.proxy_location)
    logging_config = {"enable_access_log": access_log}
    targets = [
        serve.RunTarget(target=application, name=name, route_prefix=cfg.route_prefix, logging_config=logging_config),
        serve.RunTarget(
            target=health_builder(cfg), name=name + HEALTH_SUFFIX, route_prefix=health_prefix(cfg.route_prefix),
            logging_config=logging_config,
        ),
    ]  # fmt: skip
    serve.run_many(targets, wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    url = _base_url(cfg)
    if wait:
        wait_until_ready(url, name, timeout_s)
    return url


def update_server(
    models: dict[str, str] | None = None, *, name: str = APP_NAME, rollback: bool = False, timeout_s: float = 600.0
) -> ServeConfig:
    """Swap models of the running app ``name`` in place (``models``: served name -> new model dir), or go back to
    the settings it ran before its latest update (``rollback``); return the settings now served.

    Everything else (names, limits, port, key) stays as the app runs it; a single-model app keeps the name clients
    use. Serve rolls the app over (Ray Serve's in-place update with ``serve.max_surge_percent``, 100 by default):
    replicas of the new version start, load the new model and pass their health check, then old ones stop after
    finishing the requests they hold, so capacity never drops and no request fails. With
    ``max_surge_percent: 0`` old replicas stop first and requests wait in Serve's queues for the new ones (each
    within ``serve.request_timeout_s``). Blocks until the app runs the new version only. The app keeps its
    previous settings, so a rollback is one call.

    Raises:
        ConfigError: no such app, no previous version to roll back to, a name the app does not serve, or a model
            dir that is not one (checked before anything is deployed).
        RuntimeError: the new version failed to deploy (Serve keeps serving the old one).
    """
    import ray

    if not ray.is_initialized():  # join the running cluster, never start a new one for an update
        try:
            ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
        except ConnectionError:
            raise ConfigError(
                f"no running Ray cluster to update app {name!r} on; start it first (ce-ray serve) or set RAY_ADDRESS"
            ) from None
    deadline = time.monotonic() + 10  # a driver that has just joined may read an empty status at first
    while name not in (running := serve.status().applications) and time.monotonic() < deadline:
        time.sleep(0.5)
    if name not in running:
        raise ConfigError(f"--app: no Serve app {name!r} is running (running: {', '.join(running) or 'none'})")
    current, previous = serve.get_app_handle(name).settings.remote().result()
    if rollback:
        if previous is None:
            raise ConfigError(f"--rollback: app {name!r} has not been updated, so there is no previous version")
        target = previous
    else:
        target = _with_models(current, models or {})
    _check_model_path(target)
    logging_config = {"enable_access_log": True}
    try:
        serve.run_many(
            [
                serve.RunTarget(_application(target, current), name=name, route_prefix=target.route_prefix,
                                logging_config=logging_config),
                serve.RunTarget(health_builder(target), name=name + HEALTH_SUFFIX,
                                route_prefix=health_prefix(target.route_prefix), logging_config=logging_config),
            ],
            wait_for_ingress_deployment_creation=True,
            wait_for_applications_running=False,
        )  # fmt: skip
    except RuntimeError as exc:
        raise RuntimeError(f"Serve app {name!r}: the update failed to deploy: {exc}") from None
    _wait_until_rolled_out(name, timeout_s)
    return target


def _with_models(cfg: ServeConfig, models: dict[str, str]) -> ServeConfig:
    """``cfg`` serving ``models`` (served name -> new dir; name "" for a one-model app's model) in their place."""
    served = catalog(cfg)
    if not models:
        raise ConfigError("--model: name the new model dir (--model DIR, or --model NAME=DIR) for --update")
    for requested in models:
        if (requested or not cfg.model) and served.resolve(requested) is None:
            raise ConfigError(
                f"--model {requested}=...: this app serves {', '.join(served.names)}; an update swaps a served "
                "model (--model NAME=DIR with one of those names), it does not add one"
            )
    if cfg.model:  # one model: it keeps the name clients use
        if len(models) > 1:
            raise ConfigError(f"--model: this app serves one model ({served.default}); give one new dir")
        return cfg.model_copy(update={"model": next(iter(models.values())), "model_name": served.default})
    updated = dict(cfg.models)
    for requested, location in models.items():
        updated[served.resolve(requested)] = location
    return cfg.model_copy(update={"models": updated})


def _wait_until_rolled_out(name: str, timeout_s: float) -> None:
    """Block until app ``name`` runs its new version only: RUNNING, every deployment HEALTHY, and every replica
    RUNNING (the old ones stopped, after finishing what they held)."""
    from ray.serve.schema import ReplicaState

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications[name]
        if status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve app {name!r}: the update failed to deploy:\n{status.message}")
        deployments = status.deployments.values()
        if (
            status.status == "RUNNING"
            and all(d.status == "HEALTHY" for d in deployments)
            and all(set(d.replica_states) <= {ReplicaState.RUNNING} for d in deployments)
        ):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"Serve app {name!r}: the update did not finish within {timeout_s:.0f}s")
        time.sleep(0.25)


def wait_until_ready(url: str, name: str = APP_NAME, timeout_s: float = 180.0) -> None:
    """Block until ``{url}/health`` answers 200 and Serve's proxy routes to app ``name``; raise RuntimeError if
    the app fails to deploy or times out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    proxy = "/".join(url.split("/")[:3])  # scheme://host:port
    while True:  # replicas start and the proxy learns the routes asynchronously: poll readiness, bounded
        status = serve.status().applications.get(name)
        if status is not None and status.status == "DEPLOY_FAILED":
            raise RuntimeError(f"Serve app {name!r} failed to deploy:\n{status.message}")
        try:  # healthy, and the proxy routes to the API app itself (its /health may be the health app's)
            if (
                httpx.get(f"{url}/health", timeout=HEALTH_TIMEOUT_S + 1).status_code == 200
                and name in httpx.get(f"{proxy}/-/routes", timeout=HEALTH_TIMEOUT_S + 1).json().values()
            ):
                return
        except (httpx.HTTPError, ValueError):
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
    """Delete app ``name`` and its health app (Serve stays up while other apps run); without a name, shut Serve
    down."""
    from ce_ray.serving.stats import remove_board

    try:
        running = serve.status().applications
        names = list(running) if name is None else [a for a in (name, name + HEALTH_SUFFIX) if a in running]
    except Exception:  # Serve is not running
        names = []
    if name is None:  # Serve deletes every app at once on shutdown (one by one, each waits for its replicas to drain)
        serve.shutdown()
        for app in names:
            remove_board(app)
        return
    for app in names:  # the app and its health app drain side by side
        serve.delete(app, _blocking=False)
    deadline = time.monotonic() + 120
    while (left := [a for a in names if a in serve.status().applications]) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        raise RuntimeError(f"Serve did not delete {', '.join(left)} within 120 s")
    for app in names:
        remove_board(app)
    if not serve.status().applications:
        serve.shutdown()


def metrics_url() -> str | None:
    """This node's Ray metrics endpoint, where the app's ``ce_ray_*`` and Serve's metrics are exported."""
    import ray

    try:
        node_id = ray.get_runtime_context().get_node_id()
        (node,) = [n for n in ray.nodes() if n["NodeID"] == node_id]
        return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    except Exception:
        return None


def serve_forever(cfg: ServeConfig) -> None:
    """``ce-ray serve``: start the server, print its URL, block until Ctrl-C (or SIGTERM), shut down."""

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    models = [cfg.model] if cfg.model else list(cfg.models.values())
    for warning in (*(quality_warning(m) for m in models), exposure_warning(cfg)):
        if warning:
            print(warning, file=sys.stderr, flush=True)
    url = start_server(cfg)
    served = ", ".join(f"{n} ({m})" for n, m in catalog(cfg).locations.items())  # names clients use, and their dirs
    print(f"serving {served} at {url}  (API docs: {url}/docs; Ctrl-C to stop)", flush=True)
    metrics = metrics_url()
    if metrics:
        print(f"Prometheus metrics (ce_ray_*, ray_serve_*): {metrics}", flush=True)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print("shutting down", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_server(APP_NAME)
