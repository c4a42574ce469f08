"""serve.fusion over real HTTP: the reranker's logits fused with the retriever's cosines, in every response shape.

One app: the tiny random reranker of conftest with a fusion weight in its ``ce_ray_quality.json`` (what
``ce-ray train`` writes) and the bundled all-MiniLM-L6-v2 as the retriever, ``serve.fusion: auto``. The
expected scores are computed here from ``CrossEncoder`` logits and ``SentenceTransformer`` cosines.
"""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from ce_ray.config import ConfigError, ServeConfig
from conftest import free_port

pytestmark = pytest.mark.timeout(300)

QUERY = "How many people live in Berlin?"
DOCS = [
    "Berlin is the capital of Germany.",
    "The cat sat on the mat.",
    "Berlin has 3.7 million inhabitants according to the census.",
    "Bananas are yellow.",
    "How many people live in Berlin? Lots of them.",
]
WEIGHT = 0.4
RETRIEVER = "bundled:all-MiniLM-L6-v2"


@pytest.fixture(scope="module")
def fused_model(tiny_model, tmp_path_factory):
    from sentence_transformers.cross_encoder import CrossEncoder

    from ce_ray.quality import write_model_quality

    path = str(tmp_path_factory.mktemp("fusion") / "rerank")
    CrossEncoder(tiny_model, num_labels=1).save(path)
    write_model_quality(path, {"task": "rerank", "fusion": {"weight": WEIGHT, "normalisation": "zscore-per-query", "retriever": RETRIEVER}})
    return path


def _expected(model_dir: str, query: str, docs: list[str]) -> np.ndarray:
    """sigmoid((1 - w) z(logits) + w z(cosines)), z over the request's documents."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.cross_encoder import CrossEncoder

    from ce_ray.modeling import resolve_model_name

    logits = np.asarray(CrossEncoder(model_dir).predict([(query, d) for d in docs], activation_fn=torch.nn.Identity()), float)
    encoder = SentenceTransformer(resolve_model_name(RETRIEVER))
    cos = encoder.similarity(encoder.encode([query]), encoder.encode(docs))[0].numpy().astype(float)
    z = lambda x: (x - x.mean()) / x.std()  # noqa: E731
    return 1 / (1 + np.exp(-((1 - WEIGHT) * z(logits) + WEIGHT * z(cos))))


@pytest.fixture(scope="module")
def server(ray_session, fused_model):
    from ce_ray.serving import start_server, stop_server

    url = start_server(
        ServeConfig(model=fused_model, model_name="fused", fusion="auto", port=free_port(), num_cpus=0.5, backend="torch", precision="fp32"),
        name="test-fusion",
        access_log=False,
    )
    yield url
    stop_server("test-fusion")


def test_every_shape_serves_the_fused_scores(server, fused_model):
    import cohere

    expected = _expected(fused_model, QUERY, DOCS)
    order = list(np.argsort(-expected))

    body = httpx.post(f"{server}/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60).json()
    assert [r["index"] for r in body["results"]] == order
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx(list(expected[order]), abs=1e-4)
    assert set(body["results"][0]) == {"index", "relevance_score"} and body["model"] == "fused"

    v2 = cohere.ClientV2(api_key="unused", base_url=server, max_retries=0).rerank(model="fused", query=QUERY, documents=DOCS, top_n=2)
    assert [r.index for r in v2.results] == order[:2]
    assert [r.relevance_score for r in v2.results] == pytest.approx(list(expected[order[:2]]), abs=1e-4)

    tei = httpx.post(f"{server}/rerank", json={"query": QUERY, "texts": DOCS}, timeout=60).json()
    assert isinstance(tei, list) and [r["index"] for r in tei] == order
    assert [r["score"] for r in tei] == pytest.approx(list(expected[order]), abs=1e-4)


def test_info_says_fusion_is_on_with_its_weight(server):
    info = httpx.get(f"{server}/info", timeout=30).json()
    assert info["fusion"] == {"weight": WEIGHT, "normalisation": "zscore-per-query", "retriever": RETRIEVER, "source": "auto (fitted on the eval rows)"}


def test_auto_without_a_fitted_weight_fails_before_ray(tiny_model):
    from ce_ray.serving import start_server

    with pytest.raises(ConfigError) as caught:
        start_server(ServeConfig(model=tiny_model, fusion="auto", port=free_port()))
    assert str(caught.value).startswith("serve.model: serve.fusion: auto, but model has no fusion weight fitted")
