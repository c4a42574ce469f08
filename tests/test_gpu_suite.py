"""The GPU suite's CPU dry run: the same script, every part, a tiny model and a few steps, so it is known
to work before device time is spent on it (bench/gpu_suite.sh)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow


def test_gpu_suite_dry_run_runs_every_part_and_writes_its_tables(shared_data, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", "--data", str(SHARED_DATA)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["dry_run"] is True
    parts = report["parts"]
    assert set(parts) == {"train_b64", "packing", "serve", "rerank", "nli"}
    failed = {name: part["log_tail"][-1500:] for name, part in parts.items() if part["status"] != "ok"}
    assert not failed, failed
    # each part's numbers reached the table (the values mean nothing on a CPU with a random model)
    assert parts["train_b64"]["result"]["results"][0]["samples_per_second"] > 0
    assert parts["packing"]["result"]["gain"] > 0
    assert {r["key"] for r in parts["serve"]["result"]["rows"]} == {"inprocess", "batched"}
    assert parts["rerank"]["result"]["metric"] == "eval_ndcg@10" and parts["rerank"]["result"]["baseline"]["test"]
    assert parts["nli"]["result"]["metric"] == "eval_accuracy" and parts["nli"]["result"]["test_metrics"]
    # every part joined the one Ray the suite started (a driver each), and nothing of that Ray outlives the suite
    assert report["ray"]["shared"] is True and report["ray"]["drivers"] == len(parts), report["ray"]
    import psutil

    marker = report["ray"]["temp_dir"]
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or ())]
    assert not left, left
    table = (tmp_path / "gpu_suite.md").read_text()
    assert table.startswith("# GPU suite (dry run") and all(f"| {name} | ok |" in table for name in parts)
