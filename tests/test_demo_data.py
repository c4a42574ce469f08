"""The offline demo dataset (ce_ray.demo.data): shape, balance, splits, determinism. Fast, no Ray."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ce_ray.demo.data import write_demo_data

KEYS = ["nli_train", "nli_dev", "nli_test", "rerank_train", "rerank_dev", "rerank_test"]


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    return write_demo_data(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="module")
def frames(paths) -> dict[str, pd.DataFrame]:
    return {key: pd.read_parquet(path) for key, path in paths.items()}


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_text_list(t: pa.DataType) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _is_text(t.value_type)


def test_files_and_schemas(paths):
    assert sorted(paths) == sorted(KEYS)
    for key, path in paths.items():
        assert Path(path).is_file() and path.endswith(".parquet"), key
    for split in ("train", "dev", "test"):
        schema = pq.read_schema(paths[f"nli_{split}"])
        assert schema.names == ["premise", "hypothesis", "label"]
        assert _is_text(schema.field("premise").type) and _is_text(schema.field("hypothesis").type)
        assert schema.field("label").type == pa.int64()
    schema = pq.read_schema(paths["rerank_train"])
    assert schema.names == ["query", "positive", "negative"]
    assert _is_text(schema.field("query").type) and _is_text(schema.field("positive").type)
    assert _is_text_list(schema.field("negative").type)
    for split in ("dev", "test"):
        schema = pq.read_schema(paths[f"rerank_{split}"])
        assert schema.names == ["query", "positive", "negative"]
        assert _is_text(schema.field("query").type)
        assert _is_text_list(schema.field("positive").type) and _is_text_list(schema.field("negative").type)


def test_row_counts(frames):
    assert 300 <= len(frames["nli_train"]) <= 450
    for split in ("dev", "test"):
        assert 75 <= len(frames[f"nli_{split}"]) <= 120
        assert 45 <= len(frames[f"rerank_{split}"]) <= 80
    assert 200 <= len(frames["rerank_train"]) <= 320


def test_nli_labels_balanced(frames):
    for split in ("train", "dev", "test"):
        counts = frames[f"nli_{split}"]["label"].value_counts()
        assert sorted(counts.index) == [0, 1, 2], split
        assert counts.max() - counts.min() <= max(2, len(frames[f"nli_{split}"]) // 20), (split, counts.to_dict())


def test_nli_every_premise_has_one_hypothesis_per_label(frames):
    for split in ("train", "dev", "test"):
        labels = frames[f"nli_{split}"].groupby("premise")["label"].apply(sorted)
        assert all(ls == [0, 1, 2] for ls in labels), split


def test_no_empty_texts(frames):
    def check(value, where):
        assert isinstance(value, str) and value.strip() and value == value.strip(), where

    for split in ("train", "dev", "test"):
        for row in frames[f"nli_{split}"].itertuples():
            check(row.premise, ("nli", split, row.Index))
            check(row.hypothesis, ("nli", split, row.Index))
            assert row.premise != row.hypothesis
    for row in frames["rerank_train"].itertuples():
        check(row.query, ("rerank_train", row.Index))
        check(row.positive, ("rerank_train", row.Index))
        assert len(row.negative) >= 1 and row.positive not in row.negative
        for text in row.negative:
            check(text, ("rerank_train", row.Index))
    for split in ("dev", "test"):
        for row in frames[f"rerank_{split}"].itertuples():
            check(row.query, (split, row.Index))
            for text in [*row.positive, *row.negative]:
                check(text, (split, row.Index))


def test_no_duplicate_rows(frames):
    for split in ("train", "dev", "test"):
        nli = frames[f"nli_{split}"]
        assert not nli.duplicated(["premise", "hypothesis"]).any(), split
    assert not frames["rerank_train"].duplicated(["query", "positive"]).any()
    for split in ("dev", "test"):
        df = frames[f"rerank_{split}"]
        assert df["query"].is_unique, split
        for row in df.itertuples():
            assert len(set(row.negative)) == len(row.negative), row.query
            assert len(set(row.positive)) == len(row.positive), row.query


def test_held_out_splits_are_disjoint_from_train(frames):
    train_premises = set(frames["nli_train"]["premise"])
    dev_premises, test_premises = set(frames["nli_dev"]["premise"]), set(frames["nli_test"]["premise"])
    assert not dev_premises & train_premises
    assert not test_premises & train_premises
    assert not dev_premises & test_premises

    train_queries = set(frames["rerank_train"]["query"])
    train_positives = set(frames["rerank_train"]["positive"])
    dev, test = frames["rerank_dev"], frames["rerank_test"]
    assert not set(dev["query"]) & train_queries
    assert not set(test["query"]) & train_queries
    assert not set(dev["query"]) & set(test["query"])
    # held-out facts: their answer passages are never a training positive, nor a training negative
    train_negatives = {n for negs in frames["rerank_train"]["negative"] for n in negs}
    for df in (dev, test):
        for row in df.itertuples():
            assert not set(row.positive) & train_positives, row.query
            assert not set(row.positive) & train_negatives, row.query


def test_rerank_eval_rows(frames):
    for split in ("dev", "test"):
        for row in frames[f"rerank_{split}"].itertuples():
            positives, negatives = list(row.positive), list(row.negative)
            assert len(positives) >= 1, row.query
            assert 10 <= len(negatives) <= 15, row.query
            assert not set(positives) & set(negatives), row.query


def test_deterministic(tmp_path, paths):
    again = write_demo_data(tmp_path / "again")
    assert sorted(again) == sorted(paths)
    for key in KEYS:
        pd.testing.assert_frame_equal(pd.read_parquet(again[key]), pd.read_parquet(paths[key]))
        digest = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()  # noqa: E731
        assert digest(again[key]) == digest(paths[key]), key


def test_main_writes_files(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ce_ray.demo.data", str(tmp_path / "d")],
                         capture_output=True, text=True, check=True).stdout
    for key in KEYS:
        assert key in out
    assert (tmp_path / "d" / "nli" / "train.parquet").is_file()
    assert (tmp_path / "d" / "rerank" / "dev.parquet").is_file()
