"""The public Python API (``import ce_ray``): cheap to import, jobs in three forms, in-memory data. No Ray."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pyarrow as pa
import pytest

import ce_ray


def nli_frame(n: int = 12) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "premise": [f"A man walks his dog number {i} in the park." for i in range(n)],
            "hypothesis": [f"Someone is outside with animal {i}." for i in range(n)],
            "label": [i % 3 for i in range(n)],
        }
    )


def test_importing_ce_ray_loads_no_heavy_library():
    code = "import sys, ce_ray; ce_ray.load_job(None, ['task=nli']); print(sorted(m for m in ('torch', 'ray', 'sentence_transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_prepare_takes_in_memory_rows_of_every_kind_and_saves_them_once(tmp_path):
    from datasets import Dataset

    from ce_ray.data import load_prepared

    frame = nli_frame()
    job = {"task": "nli", "train": {"batch_size": 4}, "run": {"output_dir": str(tmp_path)}}
    for rows in (Dataset.from_pandas(frame), pa.Table.from_pandas(frame), frame):
        prepared = ce_ray.prepare(job, data={"train": rows, "eval": frame.head(6)})
        assert prepared.train.rows == 12 and prepared.eval.rows == 6
        table = load_prepared(prepared.train.uri).data.table
        assert table.column("label").to_pylist() == frame["label"].tolist()
    # same content -> one input file per split, and one prepared copy (the cache hit)
    inputs = sorted(p.name for p in (tmp_path / "data" / "inputs").iterdir())
    assert len(inputs) == 2 and inputs[0].startswith("eval-") and inputs[1].startswith("train-"), inputs
    assert len([p for p in (tmp_path / "data").iterdir() if p.name.startswith("train-")]) == 1


def test_overrides_apply_to_every_job_form(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("task: nli\ntrain: {learning_rate: 3.0e-5}\n")
    from ce_ray import _job

    for job in (str(path), {"task": "nli", "train": {"learning_rate": 3e-5}}, ce_ray.load_job(path)):
        assert _job(job, ["train.epochs=2"], None).train.epochs == 2.0
        assert _job(job, None, None).train.learning_rate == 3e-5


def test_bad_input_names_the_field_before_any_work(tmp_path):
    job = {"task": "nli", "run": {"output_dir": str(tmp_path)}}
    with pytest.raises(ce_ray.ConfigError, match="data: unknown split 'dev'; use train, eval or test"):
        ce_ray.prepare(job, data={"dev": nli_frame()})
    with pytest.raises(ce_ray.ConfigError, match="data.train: in-memory rows must be a datasets.Dataset"):
        ce_ray.prepare(job, data={"train": [{"premise": "a", "hypothesis": "b", "label": 0}]})
    bad = nli_frame()
    bad.loc[3, "label"] = 7
    with pytest.raises(ce_ray.ConfigError, match="data.train: 1 invalid row\\(s\\) of 12 .*row 3: label 7 not in 0..2"):
        ce_ray.prepare(job, data={"train": bad, "eval": nli_frame(6)})
    with pytest.raises(ce_ray.ConfigError, match="train.learning_rate"):
        ce_ray.train(job, ["train.learning_rate=-1"])


def test_evaluate_scores_a_model_directory_on_the_jobs_rows(tmp_path):
    from conftest import build_tiny_model

    model = str(build_tiny_model(tmp_path / "nli-model", num_labels=3))
    metrics = ce_ray.evaluate({"task": "nli", "run": {"output_dir": str(tmp_path)}}, model, data={"test": nli_frame()})
    assert metrics["rows"] == 12 and metrics["dropped"] == 0
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "f1_macro" in metrics
