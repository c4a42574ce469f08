"""ce-ray serve end to end: real HTTP (httpx) against a real local Ray Serve, started once for the module.

Four apps run side by side on one free port, started together: a reranker (1 output, API key on) at ``/``, an NLI
classifier (3 labels, no key) at ``/nli``, a reranker whose output is inf for one word at ``/inf``, and a reranker
fused with the retriever (``serve.fusion: auto``, the bundled all-MiniLM-L6-v2) at ``/fused``. All are the tiny
random BERT from conftest, so scores are checked against ``CrossEncoder.rank`` / ``predict_pairs`` (and the
retriever's cosines) on the same weights, not against real quality.
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch

from ce_ray.config import ServeConfig
from conftest import free_port

pytestmark = pytest.mark.timeout(300)

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUERY = "How many people live in Berlin?"
DOCS = [
    "Berlin is the capital of Germany.",
    "The cat sat on the mat.",
    "Paris has many museums and a tower.",
    "Berlin has 3.7 million inhabitants according to the census.",
    "Bananas are yellow.",
    "How many people live in Berlin? Lots of them.",
]
PAIRS = [["A man is eating pizza", "A man eats something"], ["A cat sleeps", "A dog barks loudly at night"]]
LIMITS = {"max_documents": 50, "max_pairs": 50, "max_text_chars": 5000, "max_body_bytes": 200_000}
MAX_REQUEST_TOKENS = 4000


@pytest.fixture(scope="module")
def model_dirs(tiny_model, tmp_path_factory):
    """A reranker (1 output, head widened so scores differ clearly) and a 3-label NLI model."""
    from sentence_transformers.cross_encoder import CrossEncoder

    out = tmp_path_factory.mktemp("serve_models")
    reranker = CrossEncoder(tiny_model, num_labels=1)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        head = reranker.model.classifier
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 5)
        head.bias.zero_()
    reranker.save(str(out / "rerank"))
    nli = CrossEncoder(tiny_model, num_labels=3, model_kwargs={"ignore_mismatched_sizes": True})  # fresh 3-way head
    labels = ["entailment", "neutral", "contradiction"]
    nli.model.config.id2label = dict(enumerate(labels))
    nli.model.config.label2id = {label: i for i, label in enumerate(labels)}
    nli.save(str(out / "nli"))
    return SimpleNamespace(rerank=str(out / "rerank"), nli=str(out / "nli"))


FUSION_WEIGHT = 0.4
RETRIEVER = "bundled:all-MiniLM-L6-v2"
# what ce-ray train fits on the eval pairs (ce_ray.fusion.fusion_report); made up here
FUSION_SCALES = {"logit_mean": 0.05, "logit_std": 0.02, "cosine_mean": 0.3, "cosine_std": 0.15}
FUSION_CALIBRATION = {"scale": 1.7, "bias": -2.0}


def _fused_model(tiny_model, out: Path) -> str:
    """The tiny reranker with a fusion weight in its ``ce_ray_quality.json`` (what ``ce-ray train`` writes)."""
    from sentence_transformers.cross_encoder import CrossEncoder

    from ce_ray.quality import write_model_quality

    CrossEncoder(tiny_model, num_labels=1).save(str(out))
    fusion = {"weight": FUSION_WEIGHT, "normalisation": "fixed-scales", "scales": FUSION_SCALES, "calibration": FUSION_CALIBRATION,
              "retriever": RETRIEVER}  # fmt: skip
    write_model_quality(str(out), {"task": "rerank", "fusion": fusion})
    return str(out)


def _inf_model(out: Path) -> str:
    """A reranker whose output is inf for one word ("zebra": its embedding row is inf)."""
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(str(_tiny_dir(out)), num_labels=1)
    (zebra,) = model.tokenizer("zebra", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.model.bert.embeddings.word_embeddings.weight[zebra].fill_(float("inf"))
    model.save(str(out / "inf"))
    return str(out / "inf")


@pytest.fixture(scope="module")
def server(ray_session, model_dirs, tiny_model, tmp_path_factory):
    from ray import serve

    from ce_ray.serving import start_server, stop_server, wait_until_ready

    port = free_port()
    # torch fp32: the scores below equal CrossEncoder.rank's to 1e-5 (the CPU default, openvino bf16 where it is
    # native, is checked against it in test_backends.py)
    common = dict(port=port, num_cpus=0.5, max_batch_size=16, batch_wait_timeout_s=0.2, body_timeout_s=2,
                  backend="torch", precision="fp32", **LIMITS)
    models = tmp_path_factory.mktemp("serve_more")
    configs = {  # all apps start at once, then wait for all: their replicas load in parallel
        "test-rerank": ServeConfig(
            model=model_dirs.rerank, model_name="tiny-reranker", api_key=KEY, max_request_tokens=MAX_REQUEST_TOKENS, **common
        ),
        "test-nli": ServeConfig(model=model_dirs.nli, route_prefix="/nli", **common),
        "test-inf": ServeConfig(model=_inf_model(models), route_prefix="/inf", port=port, num_cpus=0.25),
        "test-fusion": ServeConfig(
            model=_fused_model(tiny_model, models / "fused"), model_name="fused", fusion="auto", route_prefix="/fused",
            port=port, num_cpus=0.5, backend="torch", precision="fp32",
        ),
    }
    urls = {name: start_server(cfg, name=name, wait=False, access_log=False) for name, cfg in configs.items()}
    for name, url in urls.items():
        wait_until_ready(url, name)
    yield SimpleNamespace(
        rerank=urls["test-rerank"], nli=urls["test-nli"], inf=urls["test-inf"], fused=urls["test-fusion"],
        fused_model=configs["test-fusion"].model, serve=serve,
    )  # fmt: skip
    stop_server()


def _post(url: str, body=None, *, content: bytes | None = None, headers: dict | None = None) -> httpx.Response:
    if content is not None:
        headers = {"content-type": "application/json", **(headers or {})}
        return httpx.post(url, content=content, headers=headers, timeout=30)
    return httpx.post(url, json=body, headers=headers, timeout=30)


def _stats(server) -> dict:
    response = httpx.get(f"{server.rerank}/info", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["totals"]


# --------------------------------------------------------------------------------------------
# correct answers
# --------------------------------------------------------------------------------------------
def test_rerank_matches_crossencoder_rank(server, model_dirs):
    from sentence_transformers.cross_encoder import CrossEncoder

    expected = CrossEncoder(model_dirs.rerank).rank(QUERY, DOCS)
    scores = sorted(r["score"] for r in expected)
    assert min(b - a for a, b in zip(scores, scores[1:])) > 1e-5  # the order below is meaningful

    response = _post(f"{server.rerank}/rerank", {"query": QUERY, "documents": DOCS}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["index"] for r in body["results"]] == [r["corpus_id"] for r in expected]
    for got, want in zip(body["results"], expected):
        assert got["relevance_score"] == pytest.approx(want["score"], abs=1e-5)
        assert "document" not in got
    assert body["model"] == "tiny-reranker"
    assert body["usage"]["documents"] == len(DOCS)
    assert body["usage"]["truncated_documents"] == 0
    assert body["usage"]["total_tokens"] > len(DOCS) * 5


def test_cohere_sdk_v1_and_v2_get_crossencoder_scores(server, model_dirs):
    """Cohere's own Python SDK (from PyPI), pointed at this server: Client.rerank -> /v1/rerank and
    ClientV2.rerank -> /v2/rerank, over real HTTP, with the server's key as the Cohere API key."""
    import cohere
    from cohere.core.api_error import ApiError as CohereError
    from sentence_transformers.cross_encoder import CrossEncoder

    expected = CrossEncoder(model_dirs.rerank).rank(QUERY, DOCS)
    v1 = cohere.Client(api_key=KEY, base_url=server.rerank, max_retries=0)
    got = v1.rerank(model="tiny-reranker", query=QUERY, documents=DOCS, top_n=3, return_documents=True)
    assert [r.index for r in got.results] == [r["corpus_id"] for r in expected[:3]]
    for result, want in zip(got.results, expected):
        assert result.relevance_score == pytest.approx(want["score"], abs=1e-5)
        assert result.document.text == DOCS[result.index]
    got = v1.rerank(query=QUERY, documents=[{"text": d} for d in DOCS])  # {text} documents, no model named
    assert sorted(r.index for r in got.results) == list(range(len(DOCS)))

    v2 = cohere.ClientV2(api_key=KEY, base_url=server.rerank, max_retries=0)
    got = v2.rerank(model="tiny-reranker", query=QUERY, documents=DOCS, priority=1)  # priority: ignored
    assert [r.index for r in got.results] == [r["corpus_id"] for r in expected]
    assert [r.relevance_score for r in got.results] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    with pytest.raises(CohereError) as caught:  # would change the scores: refused, naming the field
        v2.rerank(model="tiny-reranker", query=QUERY, documents=DOCS, relevant_spans={"enabled": True})
    assert caught.value.status_code == 422 and "relevant_spans" in str(caught.value.body)
    with pytest.raises(CohereError) as caught:
        cohere.ClientV2(api_key="wrong", base_url=server.rerank, max_retries=0).rerank(model="m", query=QUERY, documents=DOCS)
    assert caught.value.status_code == 401

    raw = _post(f"{server.rerank}/v2/rerank", {"query": QUERY, "documents": DOCS, "priority": 2, "foo": 1}, headers=AUTH)
    assert raw.status_code == 200 and raw.headers["x-ignored-fields"] == "foo,priority"


STRUCTURED = [  # object documents: ranked on title and body; their other fields come back untouched
    {"title": "Berlin", "body": DOCS[3], "id": 7, "tags": ["city", None]},
    {"title": "Pets", "body": DOCS[1], "id": 8},
    {"title": "Germany", "body": DOCS[0], "id": 9, "meta": {"source": "wiki"}},
    {"title": "Fruit", "body": DOCS[4], "id": 10},
]


def test_cohere_rank_fields_score_objects_as_key_value_lines(server, model_dirs):
    """rank_fields with object documents through Cohere's SDK, v1 and v2: each object is scored as its named
    fields' `key: value` lines in rank_fields order (scores = CrossEncoder.rank on those texts), v1's
    return_documents gives each object back as it was sent; a missing or non-string field is a 422 naming the
    document and the field."""
    import cohere
    from cohere.core.api_error import ApiError as CohereError
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(model_dirs.rerank)
    v1 = cohere.Client(api_key=KEY, base_url=server.rerank, max_retries=0)
    v2 = cohere.ClientV2(api_key=KEY, base_url=server.rerank, max_retries=0)
    for fields in (["title", "body"], ["body", "title"], ["body"]):
        rendered = ["\n".join(f"{key}: {doc[key]}" for key in fields) for doc in STRUCTURED]
        expected = model.rank(QUERY, rendered)
        got = v1.rerank(model="tiny-reranker", query=QUERY, documents=STRUCTURED, rank_fields=fields, return_documents=True)
        assert [r.index for r in got.results] == [r["corpus_id"] for r in expected]
        assert [r.relevance_score for r in got.results] == pytest.approx([r["score"] for r in expected], abs=1e-5)
        assert [r.document.model_dump(exclude_unset=True) for r in got.results] == [STRUCTURED[r.index] for r in got.results]
        got = v2.rerank(model="tiny-reranker", query=QUERY, documents=STRUCTURED,
                        request_options={"additional_body_parameters": {"rank_fields": fields}})  # fmt: skip
        assert [r.index for r in got.results] == [r["corpus_id"] for r in expected]
        assert [r.relevance_score for r in got.results] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    # over plain HTTP: the objects come back exactly (null inside them included); text documents score as they are
    mixed = [STRUCTURED[0], DOCS[2]]
    raw = _post(f"{server.rerank}/v1/rerank", {"query": QUERY, "documents": mixed, "rank_fields": ["title", "body"],
                                               "return_documents": True}, headers=AUTH)  # fmt: skip
    assert raw.status_code == 200, raw.text
    expected = {r["corpus_id"]: r["score"] for r in model.rank(QUERY, [f"title: Berlin\nbody: {DOCS[3]}", DOCS[2]])}
    for result in raw.json()["results"]:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-5)
        assert result["document"] == ({"text": DOCS[2]} if result["index"] == 1 else STRUCTURED[0])
    # {text, ...} objects without rank_fields: the text is scored, the other fields come back
    got = v1.rerank(query=QUERY, documents=[{"text": d, "n": i} for i, d in enumerate(DOCS)], return_documents=True)
    assert [r.index for r in got.results] == [r["corpus_id"] for r in model.rank(QUERY, DOCS)]
    assert all(r.document.model_dump(exclude_unset=True) == {"text": DOCS[r.index], "n": r.index} for r in got.results)

    bad = [
        ([{"title": "a", "body": "b"}, {"title": "c"}], ["title", "body"], "documents.1.body"),  # missing
        ([{"title": "a", "body": 3}], ["title", "body"], "documents.0.body"),  # not a string
        ([{"title": "a", "body": None}], ["body"], "documents.0.body"),
        ([{"title": "a", "body": ["b"]}], ["body"], "documents.0.body"),
        ([{"title": "a"}], None, "documents.0.text"),  # an object without text, and no rank_fields
        ([{"title": "a"}, 5], ["title"], "documents.1"),
    ]
    for documents, fields, field in bad:
        for client in (v1, v2):
            extra = {"rank_fields": fields} if fields else {}
            with pytest.raises(CohereError) as caught:
                client.rerank(model="tiny-reranker", query=QUERY, documents=documents,
                              request_options={"additional_body_parameters": extra})  # fmt: skip
            assert caught.value.status_code == 422, caught.value.body
            error = caught.value.body["error"]
            assert error["field"] == field and error["message"].startswith(f"{field}: "), error
    for fields, field in (([], "rank_fields"), (["title", "title"], "rank_fields"), ([""], "rank_fields"), ("title", "rank_fields")):
        body = {"query": QUERY, "documents": STRUCTURED, "rank_fields": fields}
        _assert_error(_post(f"{server.rerank}/v2/rerank", body, headers=AUTH), 422, field)


def test_tei_shape_on_rerank(server, model_dirs):
    """Text Embeddings Inference's body on POST /rerank (told apart by `texts`): its list answer, raw scores,
    return_text, and truncate: false refusing a pair that would be cut."""
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(model_dirs.rerank)
    expected = model.rank(QUERY, DOCS)
    raw = model.predict([(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity())
    response = _post(f"{server.rerank}/rerank", {"query": QUERY, "texts": DOCS, "return_text": True}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert [r["index"] for r in body] == [r["corpus_id"] for r in expected]
    assert [r["score"] for r in body] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    assert all(r["text"] == DOCS[r["index"]] for r in body)
    body = _post(f"{server.rerank}/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True}, headers=AUTH).json()
    assert all("text" not in r for r in body)
    assert {r["index"]: r["score"] for r in body} == pytest.approx(dict(enumerate(raw.tolist())), abs=1e-4)
    long_doc = " ".join(["population"] * 400)
    refused = _post(f"{server.rerank}/rerank", {"query": QUERY, "texts": [long_doc], "truncate": False}, headers=AUTH)
    _assert_error(refused, 413, "texts")
    _assert_error(_post(f"{server.rerank}/rerank", {"query": QUERY, "texts": ["ok", ""]}, headers=AUTH), 422, "texts.1")
    _assert_error(
        _post(f"{server.rerank}/rerank", {"query": QUERY, "texts": DOCS, "truncation_direction": "Left"}, headers=AUTH),
        422, "truncation_direction",
    )  # fmt: skip


def test_rerank_top_n_and_return_documents(server):
    full = _post(f"{server.rerank}/rerank", {"query": QUERY, "documents": DOCS}, headers=AUTH).json()["results"]
    response = _post(
        f"{server.rerank}/rerank",
        {"query": QUERY, "documents": DOCS, "top_n": 2, "return_documents": True, "model": "tiny-reranker"},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [r["index"] for r in full[:2]]
    assert [r["document"] for r in results] == [DOCS[r["index"]] for r in full[:2]]


def test_long_document_is_truncated_and_reported(server, model_dirs):
    """max_chunks_per_doc 1: a long document is cut at the model's window, as CrossEncoder.rank cuts it."""
    from sentence_transformers.cross_encoder import CrossEncoder

    long_doc = " ".join(["population"] * 400)  # > the tiny model's 256 tokens, < max_text_chars
    docs = [DOCS[0], long_doc]
    response = _post(f"{server.rerank}/rerank", {"query": QUERY, "documents": docs, "max_chunks_per_doc": 1}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["truncated_documents"] == 1
    expected = {r["corpus_id"]: r["score"] for r in CrossEncoder(model_dirs.rerank).rank(QUERY, docs)}
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-5)


FILLER = "the weather was mild and the river was calm near the old stone bridge . "
LONG_DOC = FILLER * 40 + "berlin has three million people living in it . " * 3  # 627 tokens: 3 windows


def _chunk_texts(tokenizer, query: str, doc: str, max_chunks: int, doc_tokens: int | None = None) -> list[str]:
    """The windows of ``doc`` the server scores, as texts: the query's tokens (at most serve.max_query_tokens, 64)
    and the document's, 256 - 3 special tokens per pair, overlapping by serve.chunk_overlap_tokens (16)."""
    ids = tokenizer(doc, add_special_tokens=False).input_ids[:doc_tokens]
    query_tokens = len(tokenizer(query, add_special_tokens=False).input_ids)
    window = 253 - min(query_tokens, max(64, 253 - len(ids)))
    spans = [(0, min(len(ids), window))]
    while spans[-1][1] < len(ids) and len(spans) < max_chunks:
        start = spans[-1][0] + window - 16
        spans.append((start, min(len(ids), start + window)))
    texts = [tokenizer.decode(ids[a:b]) for a, b in spans]
    for (a, b), text in zip(spans, texts):  # each window's text tokenizes back to the same tokens
        assert tokenizer(text, add_special_tokens=False).input_ids == ids[a:b]
    return texts


def test_long_documents_are_chunked_and_score_as_their_best_chunk(server, model_dirs):
    """serve.long_documents: chunk (the default): a document longer than the window is split into windows that each
    repeat the query, and scores as its best window: CrossEncoder.rank on those windows' texts, max per document.
    Cohere's SDK sends v1's max_chunks_per_doc (honoured up to serve.max_chunks_per_doc, with a warning above it)
    and v2's max_tokens_per_doc (the document cut to that many tokens, then chunked)."""
    import cohere
    from sentence_transformers.cross_encoder import CrossEncoder

    ce = CrossEncoder(model_dirs.rerank)
    query, docs = QUERY.lower(), [DOCS[0].lower(), LONG_DOC, FILLER * 3]

    def best_chunk(max_chunks: int, doc_tokens: int | None = None) -> list[float]:
        return [max(r["score"] for r in ce.rank(query, _chunk_texts(ce.tokenizer, query, d, max_chunks, doc_tokens)))
                for d in docs]  # fmt: skip

    chunked, first_window = best_chunk(8), best_chunk(1)
    assert chunked[1] - first_window[1] > 1e-4  # a later window of the long document scores higher than its first
    response = _post(f"{server.rerank}/rerank", {"query": query, "documents": docs}, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["chunks"] == 5 and body["usage"]["truncated_documents"] == 0  # 1 + 3 + 1 windows
    assert {r["index"]: r["relevance_score"] for r in body["results"]} == pytest.approx(dict(enumerate(chunked)), abs=1e-5)

    v1 = cohere.Client(api_key=KEY, base_url=server.rerank, max_retries=0)
    got = v1.rerank(model="tiny-reranker", query=query, documents=docs, max_chunks_per_doc=2)
    assert {r.index: r.relevance_score for r in got.results} == pytest.approx(dict(enumerate(best_chunk(2))), abs=1e-5)
    got = v1.rerank(model="tiny-reranker", query=query, documents=docs, max_chunks_per_doc=50)  # over the server's 8
    assert {r.index: r.relevance_score for r in got.results} == pytest.approx(dict(enumerate(chunked)), abs=1e-5)
    assert "serve.max_chunks_per_doc" in got.meta.warnings[0]

    v2 = cohere.ClientV2(api_key=KEY, base_url=server.rerank, max_retries=0)
    got = v2.rerank(model="tiny-reranker", query=query, documents=docs, max_tokens_per_doc=300)
    want = best_chunk(8, doc_tokens=300)
    assert {r.index: r.relevance_score for r in got.results} == pytest.approx(dict(enumerate(want)), abs=1e-5)
    assert got.meta.tokens.input_tokens < body["usage"]["total_tokens"]  # 2 windows of the long document, not 3

    tei = _post(f"{server.rerank}/rerank", {"query": query, "texts": docs, "truncate": False}, headers=AUTH)
    assert tei.status_code == 413  # TEI's shape never chunks: a long text is cut (truncate: true) or refused


def test_predict_returns_labels_and_probabilities(server, model_dirs):
    from ce_ray.modeling import load_for_inference, predict_pairs

    expected = predict_pairs(load_for_inference(model_dirs.nli), [tuple(p) for p in PAIRS])
    response = _post(f"{server.nli}/predict", {"pairs": PAIRS})  # this app has no API key
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["results"]) == len(PAIRS)
    for got, want in zip(body["results"], expected):
        assert got["label"] == want["label"] and got["label_id"] == want["label_id"]
        assert set(got["probabilities"]) == {"entailment", "neutral", "contradiction"}
        for name, p in want["probabilities"].items():
            assert got["probabilities"][name] == pytest.approx(p, abs=1e-5)
    assert body["usage"] == {"pairs": 2, "total_tokens": body["usage"]["total_tokens"], "truncated_pairs": 0}


def test_health_info_and_docs(server):
    assert httpx.get(f"{server.rerank}/health", headers=AUTH).json() == {"status": "ok", "model": "tiny-reranker"}
    assert httpx.get(f"{server.rerank}/health").json() == {"status": "ok", "model": None}  # no key: status only
    info = httpx.get(f"{server.rerank}/info", headers=AUTH).json()
    assert info["task"] == "rerank" and info["num_labels"] == 1 and info["max_length"] == 256
    assert info["device"] == "cpu" and info["precision"] == "fp32"
    assert info["limits"]["max_documents"] == LIMITS["max_documents"]
    nli = httpx.get(f"{server.nli}/info").json()
    assert nli["task"] == "nli" and nli["labels"] == ["entailment", "neutral", "contradiction"]
    # with a key, the docs need it too (serve.docs_public defaults to false then); without one they are open
    assert httpx.get(f"{server.rerank}/docs").status_code == 401
    assert httpx.get(f"{server.rerank}/openapi.json").status_code == 401
    assert httpx.get(f"{server.rerank}/docs", headers=AUTH).status_code == 200
    paths = httpx.get(f"{server.rerank}/openapi.json", headers=AUTH).json()["paths"]
    assert {"/rerank", "/predict", "/health", "/info"} <= set(paths)
    assert httpx.get(f"{server.nli}/docs").status_code == 200


def test_health_answers_from_its_own_app_and_is_503_while_its_api_is_down(server, model_dirs):
    """GET /health is served by a one-replica app of its own (a burst on the API's ingress cannot delay it),
    which answers from Serve's view of its API app: 503 while that app is not running."""
    from ce_ray.serving import health_builder

    routes = httpx.get(f"{server.rerank}/-/routes").json()
    assert (routes["/health"], routes["/nli/health"]) == ("test-rerank-health", "test-nli-health")
    ghost = ServeConfig(model=model_dirs.rerank, model_name="ghost", api_key=KEY)  # no app "ghost" runs
    server.serve.run(health_builder(ghost), name="ghost-health", route_prefix="/ghost/health")
    try:
        answer = httpx.get(f"{server.rerank}/ghost/health")
        assert (answer.status_code, answer.json()) == (503, {"status": "unavailable"})
        assert httpx.get(f"{server.rerank}/ghost/health", headers=AUTH).json() == {"status": "unavailable", "model": "ghost"}
        assert httpx.post(f"{server.rerank}/ghost/health").status_code == 405
    finally:
        server.serve.delete("ghost-health")


def test_deployment_handle_for_in_cluster_callers(server):
    from ce_ray.serving.api import ApiError, RerankResponse

    handle = server.serve.get_app_handle("test-rerank")
    response = handle.rerank.remote({"query": QUERY, "documents": DOCS}).result()
    assert isinstance(response, RerankResponse)
    http = _post(f"{server.rerank}/rerank", {"query": QUERY, "documents": DOCS}, headers=AUTH).json()
    assert [r.index for r in response.results] == [r["index"] for r in http["results"]]
    with pytest.raises(ApiError) as caught:
        handle.rerank.remote({"query": "", "documents": DOCS}).result()
    assert caught.value.status_code == 422 and caught.value.field == "query"


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------
def test_concurrent_requests_share_model_batches(server):
    before = _stats(server)

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [{"query": f"{QUERY} {i}", "documents": DOCS} for i in range(8)]
            return await asyncio.gather(*(client.post(f"{server.rerank}/rerank", json=b, headers=AUTH) for b in bodies))

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 8
    after = _stats(server)
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8  # fewer model batches than requests
    assert after["mixed_forward_passes"] > before["mixed_forward_passes"]  # a forward pass held >1 request's pairs
    assert after["max_requests_per_batch"] > 1


# --------------------------------------------------------------------------------------------
# bad input: 4xx with the field named, never a 500
# --------------------------------------------------------------------------------------------
TOO_LONG = "x" * (LIMITS["max_text_chars"] + 1)
DEEP = 30_000  # levels of nesting; Python's json recurses once per level (its limit is about 1,000)
BAD_RERANK = [
    ({"query": "", "documents": DOCS}, 422, "query"),
    ({"query": "   ", "documents": DOCS}, 422, "query"),
    ({"query": 5, "documents": DOCS}, 422, "query"),
    ({"documents": DOCS}, 422, "query"),
    ({"query": QUERY, "documents": []}, 422, "documents"),
    ({"query": QUERY, "documents": "one text"}, 422, "documents"),
    ({"query": QUERY, "documents": ["ok", ""]}, 422, "documents.1"),
    ({"query": QUERY, "documents": ["ok", 3]}, 422, "documents.1"),
    ({"query": QUERY, "documents": ["ok", None]}, 422, "documents.1"),
    ({"query": QUERY, "documents": DOCS, "top_n": 0}, 422, "top_n"),
    ({"query": QUERY, "documents": DOCS, "top_n": "2"}, 422, "top_n"),
    ({"query": QUERY, "documents": DOCS, "return_documents": "yes"}, 422, "return_documents"),
    ({"query": QUERY, "documents": DOCS, "top_k": 2}, 422, "top_k"),
    ({"query": QUERY, "documents": DOCS, "max_chunks_per_doc": 0}, 422, "max_chunks_per_doc"),
    ({"query": QUERY, "documents": DOCS, "max_chunks_per_doc": "4"}, 422, "max_chunks_per_doc"),
    ({"query": QUERY, "documents": DOCS, "max_tokens_per_doc": -1}, 422, "max_tokens_per_doc"),
    ({"query": QUERY, "documents": ["d"] * (LIMITS["max_documents"] + 1)}, 413, "documents"),
    ({"query": TOO_LONG, "documents": DOCS}, 413, "query"),
    ({"query": QUERY, "documents": ["ok", "ok", TOO_LONG]}, 413, "documents.2"),
    ({"query": QUERY, "documents": DOCS, "model": "some-other-model"}, 404, "model"),
    (b'{"query": "\\ud800", "documents": ["a"]}', 422, "query"),  # JSON's escape for a lone surrogate: not Unicode
    ({"query": QUERY, "documents": ["ok", "\u200b\u200b"]}, 422, "documents.1"),  # zero-width spaces only
    ({"query": QUERY, "documents": ["\ufeff", "ok"]}, 422, "documents.0"),  # a BOM only
    ({"query": "\x00", "documents": DOCS}, 422, "query"),  # NUL only
    ([QUERY, DOCS], 422, "body"),
    (b"{not json", 400, "body"),
    (b'{"query": "\xed\xa0\x80", "documents": ["a"]}', 422, "query"),  # raw bytes of a surrogate (json reads them as one)
    (b"", 422, "body"),
    # nested far past the parsers' recursion (tens of thousands of levels): 400 before any parser sees it
    (b"[" * DEEP + b"]" * DEEP, 400, "body"),
    (b'{"a":' * DEEP + b"1" + b"}" * DEEP, 400, "body"),
    (b'{"query": "q", "documents": ' + b"[" * DEEP + b"]" * DEEP + b"}", 400, "body"),
    (b'{"query": "q", "documents": ["a"], "x": ' + b'{"a":[' * (DEEP // 2) + b"]}" * (DEEP // 2) + b"}", 400, "body"),
    (b"[" * DEEP, 400, "body"),  # never closed
    (b'{"query": "q", "documents": ["a"], "top_n": ' + b"1" * 5000 + b"}", 400, "body"),  # past int()'s 4,300 digits
    # within the depth limit: validated as usual
    (b'{"query": "q", "documents": ' + b"[" * 60 + b'"a"' + b"]" * 60 + b"}", 422, "documents.0"),
]
BAD_PREDICT = [
    ({"pairs": []}, 422, "pairs"),
    ({"pairs": [["only one"]]}, 422, "pairs.0"),
    ({"pairs": [["a", "b", "c"]]}, 422, "pairs.0"),
    ({"pairs": [["a", ""]]}, 422, "pairs.0.1"),
    ({"pairs": [["a", 1]]}, 422, "pairs.0.1"),
    ({"pairs": "a b"}, 422, "pairs"),
    ({"pairs": [["a", "b"]] * (LIMITS["max_pairs"] + 1)}, 413, "pairs"),
    ({"pairs": [["a", TOO_LONG]]}, 413, "pairs.0.1"),
    ({"pairs": PAIRS, "model": "nope"}, 404, "model"),
]


def _send_bad(url: str, body, headers: dict | None = None) -> httpx.Response:
    if isinstance(body, bytes):
        return _post(url, content=body, headers=headers)
    return _post(url, body, headers=headers)


def _assert_error(response: httpx.Response, status: int, field: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["field"] == field, error
    assert error["type"] and field.split(".")[0] in error["message"]


@pytest.mark.parametrize(("body", "status", "field"), BAD_RERANK)
def test_bad_rerank_request(server, body, status, field):
    _assert_error(_send_bad(f"{server.rerank}/rerank", body, AUTH), status, field)


@pytest.mark.parametrize(("body", "status", "field"), BAD_PREDICT)
def test_bad_predict_request(server, body, status, field):
    _assert_error(_send_bad(f"{server.nli}/predict", body), status, field)


DEEP_BODIES = [
    b"[" * DEEP + b"]" * DEEP,
    b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    b'{"query": "q", "documents": ["a"], "priority": ' + b"[" * DEEP + b"]" * DEEP + b"}",
]


@pytest.mark.parametrize("route", ["/rerank", "/v1/rerank", "/v2/rerank", "/nli/predict"])
def test_deeply_nested_json_is_400_on_every_route_and_brackets_in_texts_are_not_nesting(server, route):
    """JSON nested tens of thousands of levels deep is refused by the depth (serve's MAX_JSON_DEPTH, 64) before
    a parser recurses through it, on every route; brackets inside strings are text, not nesting."""
    from ce_ray.serving.ingress import MAX_JSON_DEPTH

    url, headers = (f"{server.nli}/predict", None) if route == "/nli/predict" else (f"{server.rerank}{route}", AUTH)
    for body in DEEP_BODIES:
        response = _post(url, content=body, headers=headers)
        _assert_error(response, 400, "body")
        assert f"nested more than {MAX_JSON_DEPTH} levels" in response.json()["error"]["message"]
    brackets = "[{" * 2000  # 4,000 characters of brackets, escaped quotes and backslashes in a text
    if route == "/nli/predict":
        fine = _post(url, {"pairs": [[brackets, '\\"[' + brackets], PAIRS[0]]})
    else:
        fine = _post(url, {"query": brackets, "documents": ['\\"[' + brackets, *DOCS]}, headers=headers)
    assert fine.status_code == 200, fine.text


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml"]
)
def test_a_body_that_is_not_json_by_its_content_type_is_415(server, content_type):
    """A valid JSON body sent as text/plain (or a form, curl -d's default), or without a Content-Type, is refused
    (415, a JSON error naming the header and the fix) on every route; JSON and +json types are served."""
    body = b'{"query": "q", "documents": ["a", "b"]}'
    for url, headers in ((f"{server.rerank}/rerank", AUTH), (f"{server.rerank}/v2/rerank", AUTH), (f"{server.nli}/predict", {})):
        if url.endswith("/predict"):
            body = b'{"pairs": [["a", "b"]]}'
        response = httpx.post(url, content=body, headers={**headers, "content-type": content_type}, timeout=30)
        _assert_error(response, 415, "content-type")
        assert "application/json" in response.json()["error"]["message"]
        _assert_error(httpx.post(url, content=body, headers=headers, timeout=30), 415, "content-type")  # none sent
        for served in ("application/json; charset=utf-8", "application/vnd.api+json"):
            sent = {**headers, "content-type": served}
            assert httpx.post(url, content=body, headers=sent, timeout=30).status_code == 200, (url, served)
    # without the key: 401 first, whatever the body's type
    assert httpx.post(f"{server.rerank}/rerank", content=body, headers={"content-type": "text/plain"}).status_code == 401


def test_rerank_on_a_classifier_is_refused(server, model_dirs):
    response = _post(f"{server.nli}/rerank", {"query": QUERY, "documents": DOCS})
    _assert_error(response, 400, "model")
    assert "'nli'" in response.json()["error"]["message"] and model_dirs.nli not in response.text


# --------------------------------------------------------------------------------------------
# model names: what clients see and send; paths are accepted, never shown
# --------------------------------------------------------------------------------------------
def test_a_model_is_called_by_its_directory_name_and_its_path_is_an_alias(server, model_dirs):
    """The NLI app was started with serve.model = its directory and no serve.model_name: it is called "nli"
    (the directory's name) in answers, /info and errors; the path it was started with (or that path resolved)
    still names it in a request. serve.model_name ("tiny-reranker") stays an explicit name."""
    for model in ("nli", model_dirs.nli, model_dirs.nli + "/"):
        response = _post(f"{server.nli}/predict", {"pairs": PAIRS, "model": model})
        assert response.status_code == 200 and response.json()["model"] == "nli", (model, response.text)
    info = httpx.get(f"{server.nli}/info", params={"model": model_dirs.nli}).json()
    assert info["model"] == "nli"
    assert [(m["name"], m["default"]) for m in info["models"]] == [("nli", True)]
    unknown = _post(f"{server.nli}/predict", {"pairs": PAIRS, "model": "nope"})
    _assert_error(unknown, 404, "model")
    assert "this server serves 'nli'" in unknown.json()["error"]["message"]

    import cohere

    v2 = cohere.ClientV2(api_key=KEY, base_url=server.rerank, max_retries=0)
    by_name = v2.rerank(model="tiny-reranker", query=QUERY, documents=DOCS)
    by_path = v2.rerank(model=model_dirs.rerank, query=QUERY, documents=DOCS)  # the path: an alias
    assert [r.index for r in by_path.results] == [r.index for r in by_name.results]
    assert _post(f"{server.rerank}/rerank", {"query": QUERY, "documents": DOCS, "model": model_dirs.rerank},
                 headers=AUTH).json()["model"] == "tiny-reranker"  # fmt: skip


def test_default_names_come_from_the_directory_and_every_path_spelling_is_an_alias(tmp_path):
    from ce_ray.serving.catalog import catalog, default_name

    assert default_name("runs/rerank") == "rerank"
    assert default_name("/abs/runs/rerank-tune/best") == "rerank-tune"  # a train/tune output's chosen model
    assert default_name("runs/legal/final/") == "legal"
    assert default_name("s3://bucket/runs/medical") == "medical"
    assert default_name("cross-encoder/ms-marco-MiniLM-L6-v2") == "ms-marco-MiniLM-L6-v2"
    assert default_name("bundled:all-MiniLM-L6-v2") == "bundled:all-MiniLM-L6-v2"
    model = _tiny_dir(tmp_path)  # a model dir inside a tune output's best/
    output = tmp_path / "rerank-tune"
    (output).mkdir()
    model.rename(output / "best")
    served = catalog(ServeConfig(model=str(output)))
    assert served.names == ["rerank-tune"]
    for alias in ("rerank-tune", str(output), str(output / "best")):
        assert served.resolve(alias) == "rerank-tune", alias
    assert catalog(ServeConfig(model=str(output), model_name="mine")).resolve(str(output)) == "mine"
    several = catalog(ServeConfig(models={"a": str(output), "b": "s3://bucket/b"}))
    assert [several.resolve(n) for n in ("a", "b", str(output / "best"), "s3://bucket/b", "nope")] == ["a", "b", "a", "b", None]


def test_paths_are_shown_only_to_a_caller_with_the_key(server, model_dirs):
    """With an API key /info (which needs it) gives each model's path; without a key on the server, /info is
    anyone's, so it gives names only; no error answer of either app names a path."""
    info = httpx.get(f"{server.rerank}/info", headers=AUTH).json()
    assert info["model_path"] == model_dirs.rerank
    assert [(m["name"], m["path"]) for m in info["models"]] == [("tiny-reranker", model_dirs.rerank)]
    open_info = httpx.get(f"{server.nli}/info")
    assert open_info.json()["model_path"] is None and open_info.json()["models"][0]["path"] is None
    root = str(Path(model_dirs.rerank).parent)
    assert root not in open_info.text
    answers = [_send_bad(f"{server.rerank}/rerank", body, AUTH) for body, _, _ in BAD_RERANK]
    answers += [_send_bad(f"{server.nli}/predict", body) for body, _, _ in BAD_PREDICT]
    answers += [httpx.get(f"{server.rerank}/info", params={"model": "x"}, headers=AUTH), httpx.get(f"{server.nli}/info", params={"model": "x"})]
    assert all(400 <= a.status_code < 500 for a in answers)
    leaked = [a.text for a in answers if root in a.text]
    assert not leaked, leaked[:2]


def test_unknown_route_is_json_404(server):
    response = httpx.get(f"{server.rerank}/nothing-here", headers=AUTH)
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
    assert httpx.get(f"{server.rerank}/nothing-here").status_code == 401  # without the key nothing is told apart


# --------------------------------------------------------------------------------------------
# API key
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}, {"Authorization": KEY}]
)
def test_missing_or_wrong_key_is_401(server, headers):
    response = _post(f"{server.rerank}/rerank", {"query": QUERY, "documents": DOCS}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["type"] == "unauthorized"
    assert httpx.get(f"{server.rerank}/info", headers=headers).status_code == 401


def test_right_key_is_200_and_health_stays_open(server):
    assert _post(f"{server.rerank}/rerank", {"query": QUERY, "documents": DOCS}, headers=AUTH).status_code == 200
    assert httpx.get(f"{server.rerank}/health").status_code == 200


# --------------------------------------------------------------------------------------------
# robustness
# --------------------------------------------------------------------------------------------
def test_survives_200_bad_requests(server):
    bad = [(f"{server.rerank}/rerank", body, AUTH) for body, _, _ in BAD_RERANK]
    bad += [(f"{server.nli}/predict", body, None) for body, _, _ in BAD_PREDICT]
    bad += [(f"{server.rerank}/rerank", {"query": QUERY, "documents": DOCS}, {"Authorization": "Bearer x"})]

    async def fire() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:

            async def one(i: int) -> int:
                url, body, headers = bad[i % len(bad)]
                if isinstance(body, bytes):
                    headers = {"content-type": "application/json", **(headers or {})}
                    return (await client.post(url, content=body, headers=headers)).status_code
                return (await client.post(url, json=body, headers=headers)).status_code

            return await asyncio.gather(*(one(i) for i in range(200)))

    codes = asyncio.run(fire())
    assert all(400 <= code < 500 for code in codes), sorted(set(codes))
    good = _post(f"{server.rerank}/rerank", {"query": QUERY, "documents": DOCS}, headers=AUTH)
    assert good.status_code == 200 and len(good.json()["results"]) == len(DOCS)
    assert _post(f"{server.nli}/predict", {"pairs": PAIRS}).status_code == 200
    assert httpx.get(f"{server.rerank}/health").status_code == 200


def test_poisoned_requests_fail_alone_and_valid_ones_get_their_scores(server, model_dirs):
    """Hostile texts fired at the same moment as valid requests: each fails alone (4xx), every valid one gets
    200 and the scores CrossEncoder.rank gives."""
    from sentence_transformers.cross_encoder import CrossEncoder

    expected = {r["corpus_id"]: r["score"] for r in CrossEncoder(model_dirs.rerank).rank(QUERY, DOCS)}
    poison = [
        b'{"query": "\\ud800", "documents": ["a", "b"]}',
        b'{"query": "q", "documents": ["\xed\xa0\x80"]}',
        '{"query": "q", "documents": ["\u200b\ufeff\u0000"]}'.encode(),
        b'{"query": "q", "documents": ["ok", "\\udfff tail"]}',
        b'{"query": "\\u0000", "documents": ["ok"]}',
    ]

    async def fire():
        async with httpx.AsyncClient(timeout=60) as client:
            headers = {"content-type": "application/json", **AUTH}
            bad = [client.post(f"{server.rerank}/rerank", content=body, headers=headers) for body in poison]
            good = [client.post(f"{server.rerank}/rerank", json={"query": QUERY, "documents": DOCS}, headers=AUTH) for _ in range(20)]
            return await asyncio.gather(*bad), await asyncio.gather(*good)

    bad, good = asyncio.run(fire())
    assert all(400 <= r.status_code < 500 for r in bad), [(r.status_code, r.text[:200]) for r in bad]
    assert [r.status_code for r in good] == [200] * 20
    for response in good:
        for result in response.json()["results"]:
            assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-5)


def test_a_burst_gets_answers_or_503_in_time_and_health_stays_fast(server):
    """200 requests at once: each gets 200 or a JSON 503 with Retry-After (bounded queue), none waits past the
    deadline, and /health answers from the ingress meanwhile."""
    import time

    async def fire():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=250)) as client:
            async def one(i):
                started = time.monotonic()
                r = await client.post(f"{server.rerank}/rerank", json={"query": f"{QUERY} {i}", "documents": DOCS}, headers=AUTH)
                return r, time.monotonic() - started

            async def health_during():
                await asyncio.sleep(0.3)
                started = time.monotonic()
                r = await client.get(f"{server.rerank}/health")
                return r.status_code, time.monotonic() - started

            return await asyncio.gather(asyncio.gather(*(one(i) for i in range(200))), health_during())

    answers, (health_status, health_s) = asyncio.run(fire())
    codes = sorted({r.status_code for r, _ in answers})
    assert set(codes) <= {200, 503}, codes
    for r, _ in answers:
        if r.status_code == 503:
            assert r.headers.get("retry-after") and r.json()["error"]["type"] == "overloaded", (r.headers, r.text)
    assert max(s for _, s in answers) < 60  # serve.request_timeout_s
    assert health_status == 200 and health_s < 5, health_s


def test_a_batch_that_fails_is_split_so_only_the_bad_request_fails():
    """score_isolated, the rule the model replica applies to every merged batch."""
    from ce_ray.serving.batching import score_isolated

    calls = []

    def score(jobs):
        calls.append(list(jobs))
        if "poison" in jobs:
            raise UnicodeError("the tokenizer rejects this text")
        return [f"scored {job}" for job in jobs]

    out = score_isolated(score, ["a", "poison", "b"])
    assert out[0] == "scored a" and out[2] == "scored b"
    assert isinstance(out[1], UnicodeError)
    assert calls == [["a", "poison", "b"], ["a"], ["poison"], ["b"]]
    assert score_isolated(score, ["a", "b"]) == ["scored a", "scored b"]


def test_cost_is_bounded_by_tokens(server):
    """Long texts are cut by tokens (query to serve.max_query_tokens when both are long), once each, and a
    request over serve.max_request_tokens is 413 without touching the others."""
    long_text = "population " * 450  # 4,950 chars, far over the tiny model's 256 tokens
    body = {"query": long_text, "documents": [long_text] * 3, "max_chunks_per_doc": 1}
    response = _post(f"{server.rerank}/rerank", body, headers=AUTH)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["truncated_documents"] == 3 and usage["total_tokens"] == 3 * 256
    documents = [f"{i} {long_text}" for i in range(MAX_REQUEST_TOKENS // 256 + 1)]
    over = {"query": long_text, "documents": documents, "max_chunks_per_doc": 1}
    _assert_error(_post(f"{server.rerank}/rerank", over, headers=AUTH), 413, "body")
    assert "serve.max_request_tokens" in _post(f"{server.rerank}/rerank", over, headers=AUTH).json()["error"]["message"]
    # chunks count: 12 documents fit cut at the window (12 x 256 tokens), but not as their 2 windows each (12 x 479)
    chunked = {"query": "How many?", "documents": documents[:12]}
    assert _post(f"{server.rerank}/rerank", {**chunked, "max_chunks_per_doc": 1}, headers=AUTH).status_code == 200
    _assert_error(_post(f"{server.rerank}/rerank", chunked, headers=AUTH), 413, "body")


def test_key_is_checked_before_the_body_and_the_body_is_bounded(server):
    url = f"{server.rerank}/rerank"
    # no key: 401 even for a body that is not JSON (it is never parsed)
    response = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 401
    # over serve.max_body_bytes by Content-Length: 413 before it is read
    big = b'{"query": "q", "documents": ["' + b"x" * LIMITS["max_body_bytes"] + b'"]}'
    _assert_error(httpx.post(url, content=big, headers={"content-type": "application/json", **AUTH}), 413, "body")

    def chunks():  # chunked, no Content-Length: refused while it streams in
        yield b'{"query": "q", "documents": ["'
        for _ in range(40):
            yield b"y" * 10_000

    _assert_error(httpx.post(url, content=chunks(), headers={"content-type": "application/json", **AUTH}), 413, "body")
    # many invalid fields: a short error listing a few of them, not one entry per field
    response = _post(url, {"query": QUERY, "documents": [" "] * 40}, headers=AUTH)
    assert response.status_code == 422
    error = response.json()["error"]
    assert len(error["errors"]) == 5 and "(and 35 more)" in error["message"] and len(response.content) < 3000


def test_a_stalled_body_is_cut_off(server):
    """A client that sends half a request and stops gets 408 after serve.body_timeout_s (2 s here)."""
    host, port = server.rerank.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        head = f"POST /rerank HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
        head += "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        sock.sendall(head.encode() + b'{"query": ')
        answer = b""
        while chunk := sock.recv(4096):  # the server answers, then closes the connection
            answer += chunk
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert '"type":"timeout"' in answer.replace(" ", "")


def test_half_sent_requests_are_closed_and_others_are_served(server):
    """Connections that send nothing, half a request line or half their headers are closed by Ray's proxy after
    the header timeout (2 s here: CE_RAY_HEADER_TIMEOUT_S, serve.header_timeout_s), while valid requests on
    other connections are answered; a kept-alive connection idle longer than that still serves its next request."""
    import concurrent.futures

    host, port = server.rerank.removeprefix("http://").split(":")
    partial = [b"", b"POST /rerank HT", f"POST /rerank HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer".encode()]
    held = [socket.create_connection((host, int(port)), timeout=30) for _ in range(30)]
    try:
        for i, sock in enumerate(held):
            if partial[i % 3]:
                sock.sendall(partial[i % 3])
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # served meanwhile, on other connections
            answers = list(pool.map(lambda _: _post(f"{server.rerank}/rerank", {"query": QUERY, "documents": DOCS}, headers=AUTH), range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        closed_after = []
        for sock in held:
            assert sock.recv(4096) == b""  # closed by the server, without an answer (blocks until then; 30 s cap)
            closed_after.append(time.monotonic() - started)
        assert max(closed_after) < 2 + 5, closed_after
    finally:
        for sock in held:
            sock.close()

    import http.client

    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        answers = []
        for idle_s in (0, 3):
            time.sleep(idle_s)  # idle past the header timeout (not a wait for anything): idle is the keep-alive's (5 s)
            connection.request("GET", "/health")
            response = connection.getresponse()
            answers.append((response.status, response.read(), connection.sock.getsockname()))
        assert [a[0] for a in answers] == [200, 200]
        assert answers[0][2] == answers[1][2]  # the same connection served both
    finally:
        connection.close()


def test_empty_keys_are_refused_and_open_hosts_warned(model_dirs, monkeypatch):
    from ce_ray.config import ConfigError
    from ce_ray.serving.app import API_KEY_ENV, app_builder, exposure_warning

    with pytest.raises(ValueError, match="api_key is empty"):
        ServeConfig(model=model_dirs.rerank, api_key=" ")
    monkeypatch.setenv(API_KEY_ENV, "")
    with pytest.raises(ConfigError, match=f"{API_KEY_ENV} is set but empty"):
        app_builder(ServeConfig(model=model_dirs.rerank))
    monkeypatch.delenv(API_KEY_ENV)
    assert exposure_warning(ServeConfig(model=model_dirs.rerank, host="0.0.0.0")).startswith("WARNING: serving on 0.0.0.0")
    assert exposure_warning(ServeConfig(model=model_dirs.rerank, host="0.0.0.0", api_key="k")) is None
    assert exposure_warning(ServeConfig(model=model_dirs.rerank, host="127.0.0.1")) is None


def test_non_finite_scores_fail_only_their_request(server):
    """A model whose output is inf for one word, served next to the others: a request with that word is a JSON 500,
    never a null score; the same app answers other requests."""
    response = _post(f"{server.inf}/rerank", {"query": "q", "documents": ["a zebra"]})
    assert response.status_code == 500, response.text
    assert response.json()["error"]["type"] == "internal_error"
    fine = _post(f"{server.inf}/rerank", {"query": "q", "documents": ["a horse"]})
    assert fine.status_code == 200 and 0 <= fine.json()["results"][0]["relevance_score"] <= 1


def _tiny_dir(tmp_path):
    from conftest import build_tiny_model

    return build_tiny_model(tmp_path / "tiny", num_labels=1)


# --------------------------------------------------------------------------------------------
# serve.fusion: the reranker's logits fused with the retriever's cosines, in every response shape
# --------------------------------------------------------------------------------------------
FUSION_DOCS = [
    "Berlin is the capital of Germany.",
    "The cat sat on the mat.",
    "Berlin has 3.7 million inhabitants according to the census.",
    "Bananas are yellow.",
    "How many people live in Berlin? Lots of them.",
]


def _fused_expected(model_dir: str, query: str, docs: list[str]):
    """sigmoid(a ((1 - w) (logit - m_l) / s_l + w (cosine - m_c) / s_c) + b) with the model's fitted scales."""
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.cross_encoder import CrossEncoder

    from ce_ray.modeling import resolve_model_name

    logits = np.asarray(CrossEncoder(model_dir).predict([(query, d) for d in docs], activation_fn=torch.nn.Identity()), float)
    encoder = SentenceTransformer(resolve_model_name(RETRIEVER))
    cos = encoder.similarity(encoder.encode([query]), encoder.encode(docs))[0].numpy().astype(float)
    s, c = FUSION_SCALES, FUSION_CALIBRATION
    fused = (1 - FUSION_WEIGHT) * (logits - s["logit_mean"]) / s["logit_std"] + FUSION_WEIGHT * (cos - s["cosine_mean"]) / s["cosine_std"]
    return 1 / (1 + np.exp(-(c["scale"] * fused + c["bias"])))


def test_every_shape_serves_the_fused_scores(server):
    import cohere
    import numpy as np

    expected = _fused_expected(server.fused_model, QUERY, FUSION_DOCS)
    order = list(np.argsort(-expected))

    body = httpx.post(f"{server.fused}/rerank", json={"query": QUERY, "documents": FUSION_DOCS}, timeout=60).json()
    assert [r["index"] for r in body["results"]] == order
    assert [r["relevance_score"] for r in body["results"]] == pytest.approx(list(expected[order]), abs=1e-4)
    assert set(body["results"][0]) == {"index", "relevance_score"} and body["model"] == "fused"

    v2 = cohere.ClientV2(api_key="unused", base_url=server.fused, max_retries=0).rerank(model="fused", query=QUERY, documents=FUSION_DOCS, top_n=2)
    assert [r.index for r in v2.results] == order[:2]
    assert [r.relevance_score for r in v2.results] == pytest.approx(list(expected[order[:2]]), abs=1e-4)

    tei = httpx.post(f"{server.fused}/rerank", json={"query": QUERY, "texts": FUSION_DOCS}, timeout=60).json()
    assert isinstance(tei, list) and [r["index"] for r in tei] == order
    assert [r["score"] for r in tei] == pytest.approx(list(expected[order]), abs=1e-4)

    # The fitted scales are constants: a document sent alone scores as it does among the others.
    for i in (order[0], order[-1]):
        alone = httpx.post(f"{server.fused}/rerank", json={"query": QUERY, "documents": [FUSION_DOCS[i]]}, timeout=60).json()
        assert alone["results"][0]["relevance_score"] == pytest.approx(float(expected[i]), abs=1e-4)


def test_info_says_fusion_is_on_with_its_weight(server):
    info = httpx.get(f"{server.fused}/info", timeout=30).json()
    assert info["fusion"] == {"weight": FUSION_WEIGHT, "normalisation": "fixed-scales", "retriever": RETRIEVER,
                              "source": "auto (fitted on the eval rows)", "scales": FUSION_SCALES, "calibration": FUSION_CALIBRATION}  # fmt: skip
    assert httpx.get(f"{server.rerank}/info", headers=AUTH, timeout=30).json()["fusion"] is None  # off by default


def test_fusion_auto_without_a_fitted_weight_fails_before_ray(tiny_model):
    from ce_ray.config import ConfigError
    from ce_ray.serving import start_server

    with pytest.raises(ConfigError) as caught:
        start_server(ServeConfig(model=tiny_model, fusion="auto", port=free_port()))
    assert str(caught.value).startswith("serve.model: serve.fusion: auto, but model has no fusion weight fitted")


# --------------------------------------------------------------------------------------------
# jobs/serve.yaml and the typed app builder (no deployment)
# --------------------------------------------------------------------------------------------
def test_serve_yaml_is_a_valid_serve_config(model_dirs):
    from pathlib import Path

    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from ce_ray.config import ConfigError
    from ce_ray.serving import app_builder, health_builder

    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "jobs" / "serve.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert config.applications[0].import_path == "ce_ray.serving:app_builder"
    args = {**config.applications[0].args, "model": model_dirs.rerank}  # the file points at a run dir
    assert isinstance(app_builder(args), Application)
    health = config.applications[1]  # GET /health from its own app, with the same args
    assert (health.name, health.route_prefix, health.import_path) == ("ce-ray-health", "/health", "ce_ray.serving:health_builder")
    assert health.args == config.applications[0].args
    assert isinstance(health_builder(args), Application)
    with pytest.raises(ConfigError, match="serve.max_documnets: unknown key"):
        app_builder({**args, "max_documnets": 5})
    with pytest.raises(ConfigError, match="serve.model"):
        app_builder({**args, "model": "/no/such/model"})
