"""Serving that scales, over real HTTP against a real local Ray Serve: replicas, autoscaling, a replica
killed under load, several models in one app (model multiplexing), and the app's Prometheus metrics.

Every app serves tiny random BERT rerankers (conftest), with fractional CPUs so that two replicas fit on
this machine's two cores; scores are checked against ``CrossEncoder.rank`` on the same weights.
Load comes from real clients in threads (httpx), and every wait polls a condition the test can observe
(Serve's status, ``/info``, the metrics endpoint), with a deadline.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
from collections import Counter
from types import SimpleNamespace

from pathlib import Path

import httpx
import pytest
import torch

from ce_ray.config import ServeConfig
from conftest import free_port

pytestmark = pytest.mark.timeout(420)

QUERY = "How many people live in Berlin?"
DOCS = [
    "Berlin is the capital of Germany.",
    "The cat sat on the mat.",
    "Berlin has 3.7 million inhabitants according to the census.",
    "Bananas are yellow.",
]


def _wait_for(condition, timeout: float, what: str):
    """Poll ``condition`` until it returns something truthy (and return that); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def rerankers(tiny_model, tmp_path_factory):
    """Three rerankers with different heads (so each model's scores are its own)."""
    from sentence_transformers.cross_encoder import CrossEncoder

    out = tmp_path_factory.mktemp("scale_models")
    paths = {}
    for seed, name in enumerate(("a", "b", "c")):
        model = CrossEncoder(tiny_model, num_labels=1)
        with torch.no_grad():
            head = model.model.classifier
            head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * 5)
        model.save(str(out / name))
        paths[name] = str(out / name)
    return SimpleNamespace(**paths)


@pytest.fixture(scope="module")
def serve_up(ray_session):
    """Serve on a free port for this module; each test deploys and deletes its own app."""
    from ray import serve

    from ce_ray.serving import stop_server

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield SimpleNamespace(port=port, serve=serve)
    stop_server()


def _start(serve_up, name: str, **fields) -> str:
    from ce_ray.serving import start_server

    cfg = ServeConfig(
        port=serve_up.port, route_prefix=f"/{name}", num_cpus=0.5, batch_wait_timeout_s=0.01,
        backend="torch", precision="fp32",  # exact CrossEncoder.rank scores (the CPU default is OpenVINO bf16)
        **fields,
    )  # fmt: skip
    return start_server(cfg, name=name, access_log=False)


def _running_replicas(serve, app: str) -> int:
    status = serve.status().applications.get(app)
    if status is None or "CrossEncoderModel" not in status.deployments:
        return 0
    return status.deployments["CrossEncoderModel"].replica_states.get("RUNNING", 0)


def _info(url: str, **params) -> dict:
    response = httpx.get(f"{url}/info", params=params, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


class Load:
    """``clients`` threads, each posting /rerank in a loop until :meth:`stop`; every outcome is recorded."""

    def __init__(self, url: str, clients: int, documents: int = 16):
        self.url, self.body = url, {"query": QUERY, "documents": (DOCS * 8)[:documents]}
        self.outcomes: list[tuple[float, int | str, dict]] = []  # (time, status or error, headers)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self) -> None:
        with httpx.Client(timeout=90) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(f"{self.url}/rerank", json=self.body)
                    outcome = (time.monotonic(), response.status_code, dict(response.headers), response.text)
                except httpx.HTTPError as exc:  # a hang ends in a timeout, a dropped connection in an error
                    outcome = (time.monotonic(), type(exc).__name__, {}, "")
                with self._lock:
                    self.outcomes.append(outcome)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def stop(self) -> Counter:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)
        return Counter(status for _, status, _, _ in self.outcomes)


# --------------------------------------------------------------------------------------------
# two replicas: load spread, /info lists both, metrics, a replica killed under load
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two(serve_up, rerankers):
    from ce_ray.serving import stop_server

    url = _start(serve_up, "two", model=rerankers.a, num_replicas=2)
    _wait_for(lambda: _running_replicas(serve_up.serve, "two") == 2 and len(_info(url)["replicas"]) == 2, 60, "both replicas")
    yield url
    stop_server("two")


def test_two_replicas_share_the_load_and_info_lists_both(two, rerankers):
    from sentence_transformers.cross_encoder import CrossEncoder

    expected = [r["corpus_id"] for r in CrossEncoder(rerankers.a).rank(QUERY, (DOCS * 8)[:8])]
    before = {r["replica"]: r["requests"] for r in _info(two)["replicas"]}
    load = Load(two, clients=8, documents=8)

    def both_busy() -> bool:
        return all(r["requests"] > before[r["replica"]] for r in _info(two)["replicas"])

    _wait_for(lambda: load.count() >= 80 and both_busy(), 120, "80 answers, from both replicas")
    statuses = load.stop()
    assert statuses == {200: load.count()}
    for _, _, _, text in load.outcomes[:5]:
        assert [r["index"] for r in httpx.Response(200, text=text).json()["results"]] == expected

    def counted() -> dict | None:
        info = _info(two)
        return info if info["totals"]["requests"] - sum(before.values()) == load.count() else None

    info = _wait_for(counted, 15, "the counters of every request")
    replicas = info["replicas"]
    assert len(replicas) == 2 and info["totals"]["replicas"] == 2
    assert len({r["pid"] for r in replicas}) == 2
    assert sum(r["requests"] for r in replicas) == info["totals"]["requests"]
    # An open server (no API key) names the model by its directory and shows no path.
    (model,) = info["models"]
    versions = model.pop("versions")
    assert model == {"name": Path(rerankers.a).name, "path": None, "default": True, "loaded_on": 2}
    # both replicas loaded the same files, so they serve one version
    assert len(versions) == 1 and versions[0]["replicas"] == 2 and len(versions[0]["version"]) == 12


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def test_metrics_reach_rays_prometheus_endpoint(two):
    """The app's ray.serve.metrics, scraped from Ray's own metrics endpoint as Prometheus would."""
    import ray

    from ce_ray.serving import metrics_url

    for _ in range(3):
        assert httpx.post(f"{two}/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60).status_code == 200
    assert httpx.post(f"{two}/rerank", json={"query": "", "documents": DOCS}, timeout=60).status_code == 422
    assert metrics_url() and metrics_url().endswith("/metrics")
    port = ray.nodes()[0]["MetricsExportPort"]
    # this app's series only: earlier apps in the same Ray session export the same metric names
    wanted = (
        ("ray_ce_ray_requests_total{", 'route="/rerank"', 'status="200"'),
        ("ray_ce_ray_requests_total{", 'route="/rerank"', 'status="422"'),
        ("ray_ce_ray_request_pairs_total{", 'status="200"'),
        ("ray_ce_ray_pairs_total{",), ("ray_ce_ray_batch_requests_bucket{",), ("ray_ce_ray_queue_wait_seconds_bucket{",),
        ("ray_ce_ray_forward_seconds_bucket{",), ("ray_ce_ray_request_seconds_bucket{",),
    )  # fmt: skip

    def exported() -> list[str] | None:
        lines = [line for line in _scrape(port).splitlines() if 'application="two"' in line]
        found = all(any(line.startswith(w[0]) and all(part in line for part in w[1:]) for line in lines) for w in wanted)
        return lines if found else None

    lines = _wait_for(exported, 90, "this app's ce_ray_* metrics")
    pairs = [line for line in lines if line.startswith("ray_ce_ray_pairs_total{")]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in pairs) >= 3 * len(DOCS)

def test_a_killed_replica_is_replaced_and_clients_get_answers_or_503(two):
    from ray import serve

    killed = _info(two)["replicas"][0]
    load = Load(two, clients=6, documents=8)
    _wait_for(lambda: load.count() >= 20, 60, "load running")
    os.kill(killed["pid"], signal.SIGKILL)
    killed_at = time.monotonic()

    def replaced() -> bool:
        replicas = _info(two)["replicas"]
        return len(replicas) == 2 and killed["replica"] not in {r["replica"] for r in replicas}

    _wait_for(lambda: _running_replicas(serve, "two") == 2 and replaced(), 90, "a new replica")
    recovered_s = time.monotonic() - killed_at
    _wait_for(lambda: sum(1 for t, s, _, _ in load.outcomes if t > killed_at + recovered_s and s == 200) >= 10,
              60, "answers after the recovery")  # fmt: skip
    statuses = load.stop()
    assert set(statuses) <= {200, 503}, statuses  # never a hang, a dropped connection or a 500
    for _, status, headers, text in load.outcomes:
        if status == 503:
            assert headers.get("retry-after") and '"error"' in text
    failed = statuses[503] / sum(statuses.values())
    print(f"\nreplica killed: {statuses[503]}/{sum(statuses.values())} requests got 503 ({failed:.1%}), "
          f"a new replica served after {recovered_s:.1f}s")  # fmt: skip
    assert failed < 0.5
    assert httpx.get(f"{two}/health", timeout=60).status_code == 200


# --------------------------------------------------------------------------------------------
# autoscaling
# --------------------------------------------------------------------------------------------
def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(serve_up, rerankers):
    from ray import serve

    from ce_ray.serving import stop_server

    url = _start(
        serve_up, "auto", model=rerankers.a, num_replicas="auto", min_replicas=1, max_replicas=2,
        target_ongoing_requests=2, upscale_delay_s=1, downscale_delay_s=3, look_back_period_s=2,
    )  # fmt: skip
    try:
        assert _running_replicas(serve, "auto") == 1
        load = Load(url, clients=8)
        _wait_for(lambda: _running_replicas(serve, "auto") == 2, 120, "a second replica")
        _wait_for(lambda: len(r := _info(url)["replicas"]) == 2 and all(x["requests"] > 0 for x in r), 60,
                  "the new replica taking requests")  # fmt: skip
        statuses = load.stop()
        _wait_for(lambda: _running_replicas(serve, "auto") == 1, 120, "the scale-down to one replica")
        assert statuses == {200: sum(statuses.values())}, statuses  # nothing failed while replicas came and went
        _wait_for(lambda: len(_info(url)["replicas"]) == 1, 15, "/info listing one replica")
    finally:
        stop_server("auto")


# --------------------------------------------------------------------------------------------
# several models in one app
# --------------------------------------------------------------------------------------------
def test_several_models_are_loaded_on_demand_with_an_lru_bound(serve_up, rerankers):
    from sentence_transformers.cross_encoder import CrossEncoder

    from ce_ray.serving import stop_server

    models = {"a": rerankers.a, "b": rerankers.b, "c": rerankers.c}
    url = _start(serve_up, "multi", models=models, max_models_per_replica=2)
    try:
        for name in ("a", "b", "c"):
            expected = CrossEncoder(models[name]).rank(QUERY, DOCS)
            body = httpx.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCS, "model": name}, timeout=60).json()
            assert body["model"] == name
            assert [r["index"] for r in body["results"]] == [r["corpus_id"] for r in expected]
            assert [r["relevance_score"] for r in body["results"]] == pytest.approx([r["score"] for r in expected], abs=1e-5)
        default = httpx.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60).json()  # the first
        assert default["model"] == "a"
        unknown = httpx.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCS, "model": "z"}, timeout=60)
        assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "model"
        assert "'a', 'b', 'c'" in unknown.json()["error"]["message"]

        assert httpx.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCS, "model": models["c"]},
                          timeout=60).json()["model"] == "c"  # a model's path is an alias of its name  # fmt: skip
        info = _info(url, model="a")
        assert info["model"] == "a" and info["model_path"] is None  # no API key: /info is anyone's, no paths
        info = _info(url, model="c")  # after a, b, c, a, c, a: the replica keeps the two used last
        assert info["replicas"][0]["models"] == ["a", "c"]
        assert [(m["name"], m["default"], m["loaded_on"]) for m in info["models"]] == [
            ("a", True, 1), ("b", False, 0), ("c", False, 1)
        ]  # fmt: skip
        assert httpx.get(f"{url}/info", params={"model": "z"}, timeout=60).status_code == 404
    finally:
        stop_server("multi")
