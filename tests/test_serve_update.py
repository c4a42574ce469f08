"""Live model updates: a running app swaps its model in place, and rolls back, while 8 clients keep sending requests.

Real local Ray Serve, real HTTP (httpx) from 8 client threads. The two models are the tiny random BERT with two
different scoring heads, so every answer tells which model gave it (checked against ``CrossEncoder.rank``).
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch

from ce_ray.config import ConfigError, ServeConfig
from conftest import free_port

pytestmark = pytest.mark.timeout(600)

QUERY = "How many people live in Berlin?"
DOCS = ["Berlin is the capital of Germany.", "The cat sat on the mat.", "Berlin has 3.7 million inhabitants."]
CLIENTS = 8


def _reranker(tiny_model: str, path, seed: int) -> str:
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(tiny_model, num_labels=1)
    with torch.no_grad():
        head = model.model.classifier
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(seed)) * 5)
        head.bias.zero_()
    model.save(str(path))
    return str(path)


def _expected(model_dir: str) -> list[float]:
    from sentence_transformers.cross_encoder import CrossEncoder

    ranked = CrossEncoder(model_dir).rank(QUERY, DOCS)
    return [s for _, s in sorted((r["corpus_id"], float(r["score"])) for r in ranked)]


class Clients:
    """``CLIENTS`` threads, each sending /rerank requests one after another until :meth:`stop`."""

    def __init__(self, url: str):
        self.url, self.answers = url, []  # (sent_at, done_at, status, scores by index)
        self._cond, self._stop = threading.Condition(), threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(CLIENTS)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        with httpx.Client(timeout=120) as client:
            while not self._stop.is_set():
                sent = time.monotonic()
                response = client.post(f"{self.url}/rerank", json={"query": QUERY, "documents": DOCS, "model": "model-a"})
                scores = response.text[:300]  # the error, when it is not a 200
                if response.status_code == 200:
                    scores = [s for _, s in sorted((r["index"], r["relevance_score"]) for r in response.json()["results"])]
                with self._cond:
                    self.answers.append((sent, time.monotonic(), response.status_code, scores))
                    self._cond.notify_all()

    def wait_for(self, count: int, sent_after: float = float("-inf")) -> None:
        """Until ``count`` answers to requests sent after ``sent_after`` have come back."""
        with self._cond:
            assert self._cond.wait_for(lambda: sum(a[0] > sent_after for a in self.answers) >= count, timeout=300)

    def stop(self) -> list:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)
        return self.answers


def _info(url: str) -> dict:
    response = httpx.get(f"{url}/info", timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_model_is_swapped_and_rolled_back_while_8_clients_keep_getting_200(ray_session, tiny_model, tmp_path):
    from ce_ray.modeling import content_hash
    from ce_ray.serving import start_server, stop_server, update_server

    old = _reranker(tiny_model, tmp_path / "v1" / "model-a", seed=0)
    new = _reranker(tiny_model, tmp_path / "v2" / "model-b", seed=1)
    want_old, want_new = _expected(old), _expected(new)
    assert max(abs(a - b) for a, b in zip(want_old, want_new)) > 1e-3  # each answer tells its model
    cfg = ServeConfig(model=old, port=free_port(), route_prefix="/update", num_cpus=0.5, backend="torch", precision="fp32")
    url = start_server(cfg, name="test-update", access_log=False)
    try:
        info = _info(url)
        assert info["model"] == "model-a" and info["version"]["version"] == content_hash(old)

        # bad updates are refused before anything is deployed
        with pytest.raises(ConfigError, match="--rollback"):
            update_server(name="test-update", rollback=True)  # never updated: nothing to go back to
        with pytest.raises(ConfigError, match="serves model-a"):
            update_server({"legal": new}, name="test-update")
        with pytest.raises(ConfigError, match="not a model directory"):
            update_server({"": str(tmp_path)}, name="test-update")

        clients = Clients(url)
        clients.wait_for(CLIENTS)
        update_started = time.monotonic()
        served = update_server({"": new}, name="test-update")  # returns once only the new version runs
        updated = time.monotonic()
        assert served.model == new and served.model_name == "model-a"  # clients keep the name they use
        clients.wait_for(2 * CLIENTS, sent_after=updated)
        info = _info(url)
        assert info["model"] == "model-a" and info["version"]["version"] == content_hash(new)
        (model,) = info["models"]
        assert [(v["version"], v["replicas"]) for v in model["versions"]] == [(content_hash(new), 1)]

        rollback_started = time.monotonic()
        served = update_server(name="test-update", rollback=True)
        rolled_back = time.monotonic()
        assert served.model == old
        clients.wait_for(2 * CLIENTS, sent_after=rolled_back)
        answers = clients.stop()
        assert _info(url)["version"]["version"] == content_hash(old)
    finally:
        stop_server("test-update")

    assert [(status, body) for _, _, status, body in answers if status != 200] == []  # none failed through both swaps
    phases = {"before": [], "new": [], "after": [], "rolling": []}
    for sent, done, _, scores in answers:
        if done < update_started:
            phases["before"].append(scores)
        elif sent > updated and done < rollback_started:
            phases["new"].append(scores)
        elif sent > rolled_back:
            phases["after"].append(scores)
        else:  # sent or answered while a version rolled out: one model's scores or the other's, nothing else
            assert scores == pytest.approx(want_old, abs=1e-5) or scores == pytest.approx(want_new, abs=1e-5)
    assert len(phases["new"]) >= 2 * CLIENTS and len(phases["after"]) >= 2 * CLIENTS
    assert phases["before"] == [pytest.approx(want_old, abs=1e-5)] * len(phases["before"])
    assert phases["new"] == [pytest.approx(want_new, abs=1e-5)] * len(phases["new"])  # once swapped: the new model
    assert phases["after"] == [pytest.approx(want_old, abs=1e-5)] * len(phases["after"])  # rolled back
