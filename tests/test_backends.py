"""serve.backend onnx / openvino / auto and ``ce-ray export``: the tiny reranker exported, served over real HTTP (httpx
against a real local Ray Serve), scores compared with ``CrossEncoder.rank`` on the same weights; bad combinations
fail before any Ray work.
"""

from __future__ import annotations

import os

import httpx
import pytest
import torch

from ce_ray.config import ConfigError, ServeConfig, load_job
from conftest import free_port

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.timeout(300)

QUERY = "How many people live in Berlin?"
DOCS = [
    "Berlin is the capital of Germany.",
    "The cat sat on the mat.",
    "Berlin has 3.7 million inhabitants according to the census.",
    "Bananas are yellow.",
    "How many people live in Berlin? Lots of them, and the city keeps growing every single year.",
]


@pytest.fixture(scope="module")
def reranker(tiny_model, tmp_path_factory) -> str:
    """The tiny reranker (head widened so scores differ clearly), exported to plain and int8 ONNX and OpenVINO."""
    from sentence_transformers.cross_encoder import CrossEncoder

    from ce_ray.cli import main

    path = str(tmp_path_factory.mktemp("backends") / "rerank")
    model = CrossEncoder(tiny_model, num_labels=1)
    with torch.no_grad():
        head = model.model.classifier
        head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(0)) * 5)
        head.bias.zero_()
    model.save(path)
    assert main(["export", path, "--backend", "onnx", "--quantize", "avx512_vnni"]) == 0  # the real command
    if _has("openvino"):
        assert main(["export", path, "--backend", "openvino"]) == 0
    return path


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_export_writes_sentence_transformers_layout_atomically(reranker, tmp_path):
    from ce_ray.serving.backends import export_backend

    files = sorted(os.listdir(os.path.join(reranker, "onnx")))
    assert files == ["model.onnx", "model_qint8_avx512_vnni.onnx"]  # the base graph, kept, and the quantized one
    parent = os.path.dirname(reranker)
    assert not [f for f in os.listdir(parent) if f.startswith(".ce-ray-export-")]  # no temp folder left behind

    written = export_backend(reranker, "onnx", optimize="O2", output=str(tmp_path / "copy"))
    assert written == str(tmp_path / "copy" / "onnx" / "model_O2.onnx")
    assert sorted(os.listdir(tmp_path / "copy" / "onnx")) == ["model.onnx", "model_O2.onnx", "model_qint8_avx512_vnni.onnx"]
    assert os.path.isfile(tmp_path / "copy" / "config.json")  # a whole model dir: serve --model copy works
    assert sorted(os.listdir(os.path.join(reranker, "onnx"))) == files  # the source is untouched

    with pytest.raises(ConfigError, match="--output: .* exists and is not empty"):
        export_backend(reranker, "onnx", output=str(tmp_path / "copy"))
    with pytest.raises(ConfigError, match="--quantize: for --backend onnx only"):
        export_backend(reranker, "openvino", quantize="qint8")
    with pytest.raises(ConfigError, match="MODEL: .* not a local model directory"):
        export_backend(str(tmp_path / "nothing"), "onnx")


def test_onnx_and_openvino_servers_score_like_crossencoder_rank(ray_session, reranker):
    from sentence_transformers.cross_encoder import CrossEncoder

    from ce_ray.serving import start_server, stop_server, wait_until_ready

    expected = {r["corpus_id"]: r["score"] for r in CrossEncoder(reranker).rank(QUERY, DOCS)}
    port = free_port()
    from ce_ray.serving.backends import resolve_backend, serving_precision

    apps = {
        "onnx": {"backend": "onnx"},
        "onnx-int8": {"backend": "onnx", "model_file": "model_qint8_avx512_vnni.onnx"},
        "default": {},  # the CPU default: openvino (bf16 where native) when installed, else torch
    }
    if _has("openvino"):
        apps["openvino"] = {"backend": "openvino", "precision": "fp32"}
    urls = {}
    for name, settings in apps.items():  # start all, then wait: their replicas load in parallel
        cfg = ServeConfig(model=reranker, port=port, route_prefix=f"/{name}", num_cpus=0.5, **settings)
        urls[name] = start_server(cfg, name=f"test-{name}", wait=False, access_log=False)
    try:
        for name, url in urls.items():
            wait_until_ready(url, f"test-{name}")
            answer = httpx.post(f"{url}/rerank", json={"query": QUERY, "documents": DOCS}, timeout=60)
            assert answer.status_code == 200, answer.text
            got = {r["index"]: r["relevance_score"] for r in answer.json()["results"]}
            cfg = ServeConfig(model=reranker, **apps[name])
            exact = serving_precision(cfg, "cpu") == "fp32"
            tolerance = 1e-4 if exact else 0.05  # int8 weights or bf16 move scores a little
            assert got == pytest.approx(expected, abs=tolerance), name
            if exact:  # same order as torch
                assert [r["index"] for r in answer.json()["results"]] == sorted(expected, key=expected.get, reverse=True)
            info = httpx.get(f"{url}/info", timeout=60).json()
            assert info["backend"] == resolve_backend(cfg, "cpu")
            assert info["precision"] == serving_precision(cfg, "cpu")
            if info["backend"] != "torch":
                assert info["model_file"].endswith(apps[name].get("model_file", "model.onnx" if info["backend"] == "onnx" else ".xml"))
    finally:
        for name in urls:
            stop_server(f"test-{name}")


def test_bad_backend_settings_fail_before_ray(reranker, tiny_model):
    from ce_ray.serving.app import app_builder

    for overrides, message in (
        (["serve.backend=onnx", "serve.precision=bf16"], "precision bf16 with backend onnx"),
        (["serve.backend=onnx", "serve.precision=fp16"], "precision fp16 needs a GPU"),
        (["serve.backend=openvino", "serve.num_gpus=1"], "backend openvino runs on CPU here"),
        (["serve.model_file=model.onnx"], "model_file is for backend onnx or openvino"),
        (["serve.backend=onnx", "serve.model_file=openvino_model.xml"], r"model_file: 'openvino_model.xml' is not a \*.onnx"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_job(None, ["task=rerank", f"serve.model={reranker}", *overrides])
    with pytest.raises(ConfigError, match=r"serve.model_file: .*model_O3.onnx does not exist \(it has model.onnx, "):
        app_builder(ServeConfig(model=reranker, backend="onnx", model_file="model_O3.onnx"))
    with pytest.raises(ConfigError, match="serve.model_file: .* \\(it has no onnx/ folder\\)"):
        app_builder(ServeConfig(model=tiny_model, backend="onnx", model_file="model_O3.onnx"))
    app_builder(ServeConfig(model=tiny_model, backend="onnx"))  # no onnx/ yet: the replica exports plain ONNX


def test_the_cpu_default_is_openvino_in_bf16_where_native(reranker):
    from ce_ray.runtime import native_bf16
    from ce_ray.serving.backends import resolve_backend, serving_precision

    default = ServeConfig(model=reranker)
    assert default.backend == "auto" and default.precision == "auto"
    assert resolve_backend(default, "cpu") == ("openvino" if _has("openvino") else "torch")
    assert resolve_backend(default, "cuda") == "torch"
    assert serving_precision(default, "cpu") == ("bf16" if native_bf16(use_gpu=False) else "fp32")
    assert serving_precision(default, "cuda") == "fp16"
    assert serving_precision(ServeConfig(model=reranker, backend="onnx", model_file="model_qint8_avx2.onnx"), "cpu") == "int8"
