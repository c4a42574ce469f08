"""data.prepare_on: cluster on this machine's Ray (one node): the same rows and errors as the driver path, and a cache
hit that starts no task. The two-node run (head with no CPUs, 20k pairs, then training) is in test_cluster.py."""

from __future__ import annotations

import pandas as pd
import pytest

from ce_ray.config import load_job
from ce_ray.data import DataError, load_prepared, prepare_split
from conftest import assert_same_negatives

pytestmark = pytest.mark.slow


def _job(path, out, where: str, encoder: str, *extra: str):
    # one mining actor (each loads the encoder); the tiny random encoder scores everything alike: no score filters
    # (the search with them is checked against mine_hard_negatives and all-MiniLM-L6-v2 in test_losses.py); fp32, as
    # bf16 may swap near-ties
    return load_job(None, [
        "task=rerank", "train.loss=LambdaLoss", f"data.train={{path: {path}, columns: {{query: question, positive: answer}}}}",
        f"run.output_dir={out}", f"data.prepare_on={where}", f"data.negatives.model={encoder}", "data.negatives.num=3",
        "data.negatives.sampling=top", "data.negatives.max_score=null", "data.negatives.relative_margin=null",
        "data.negatives.concurrency=1", "data.negatives.precision=fp32", *extra,
    ])  # fmt: skip


def _prepare_tasks(ray) -> int:
    from ray.util.state import list_tasks

    return len(list_tasks(filters=[("name", "=", "ce_ray.prepare_train")], limit=1000, raise_on_missing_output=False))


def test_the_cluster_path_mines_the_driver_paths_negatives_and_a_rerun_is_a_cache_hit(ray_session, qa_files, tiny_model, tmp_path):
    driver = prepare_split(_job(qa_files["train"], tmp_path / "driver", "driver", tiny_model), "train")
    assert driver.prepared_on == {"path": "driver"}

    job = _job(qa_files["train"], tmp_path / "cluster", "cluster", tiny_model)
    split = prepare_split(job, "train")
    assert split.prepared_on["path"] == "cluster" and split.prepared_on["node"] == ray_session.get_runtime_context().get_node_id()
    assert split.uri.rsplit("/", 1)[-1] == driver.uri.rsplit("/", 1)[-1], "the same cache key as the driver path"
    assert (split.rows, split.columns) == (driver.rows, driver.columns)
    a, b = (load_prepared(s.uri).data.table.to_pydict() for s in (driver, split))
    assert all(0.0 in labels for labels in b["labels"])
    assert assert_same_negatives(a, b, job.data.negatives.model) <= 1

    # a second run reads what the first wrote: no preparation task starts
    tasks = _prepare_tasks(ray_session)
    assert prepare_split(job, "train") == split
    assert _prepare_tasks(ray_session) == tasks


def test_bad_rows_fail_on_the_driver_with_the_driver_paths_message(ray_session, tiny_model, tmp_path):
    frame = pd.DataFrame({"question": [f"question {i}?" for i in range(6)], "answer": [f"answer {i}." for i in range(6)]})
    frame.loc[3, "answer"] = "  "
    frame.to_parquet(tmp_path / "bad.parquet")
    errors = {}
    for where in ("driver", "cluster"):
        with pytest.raises(DataError) as info:
            prepare_split(_job(tmp_path / "bad.parquet", tmp_path / where, where, tiny_model), "train")
        errors[where] = str(info.value)
    assert errors["cluster"] == errors["driver"] and "data.train" in errors["driver"] and "row 3" in errors["driver"]
