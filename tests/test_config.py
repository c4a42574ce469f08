"""The job schema: shipped files validate, overrides work, bad configs fail with the key named."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from ce_ray.config import ConfigError, describe_keys, load_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"
SHIPPED = sorted(p for p in JOBS.glob("*.yaml") if p.name not in {"serve.yaml", "runtime_env.yaml"})


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_job_validates(path):
    job = load_job(path)
    assert job.task in {"nli", "rerank"}
    assert job.loss.name  # filled in
    assert job.num_labels == (3 if job.task == "nli" else 1)


def test_a_run_sees_local_paths_as_absolute_and_uris_as_given(tmp_path, monkeypatch):
    """Relative paths mean the directory ce-ray runs in; the run's own processes (a Tune trial runs in its trial
    directory, a worker on another node in its own) get them absolute."""
    monkeypatch.chdir(tmp_path)
    job = load_job(
        None,
        ["task=rerank", "data.train=[{path: a.parquet}, {path: s3://bucket/b.parquet}]", "data.eval=sub/dev.jsonl",
         "data.test=file:///data/test.csv", "run.output_dir=out"],
    ).for_run()
    assert [s.path for s in job.data.train_sources] == [str(tmp_path / "a.parquet"), "s3://bucket/b.parquet"]
    assert (job.data.eval.path, job.data.test.path, job.run.output_dir) == (str(tmp_path / "sub/dev.jsonl"), "/data/test.csv", str(tmp_path / "out"))
    for given, seen in (("cache", str(tmp_path / "cache")), ("s3://bucket/cache", "s3://bucket/cache")):
        assert load_job(None, ["task=nli", "data.train=a.parquet", "data.eval=b.parquet", f"data.cache_dir={given}"]).for_run().data.cache_dir == seen


def test_issue_keys_exist_and_override():
    job = load_job(
        None,
        [
            "task=rerank",
            "model.name=some/model",
            "data.train=/x/train.parquet",
            "data.eval=/x/dev.parquet",
            "data.test=/x/test.jsonl",
            "train.loss=ListNetLoss",
            "train.learning_rate=3e-5",
            "train.batch_size=16",
            "train.epochs=2",
            "train.max_steps=100",
            "train.precision=bf16",
            "scaling.num_workers=4",
            "scaling.use_gpu=true",
            "scaling.cpus_per_worker=2",
            "scaling.gpus_per_worker=0.5",
            "run.output_dir=s3://bucket/prefix",
            "run.name=exp-1",
            "run.max_failures=3",
            "run.checkpoint_every=25",
        ],
    )
    assert job.data.train.path == "/x/train.parquet"  # a plain string is a local file
    assert job.data.test.path == "/x/test.jsonl"
    assert job.loss.name == "ListNetLoss"
    assert job.train.learning_rate == pytest.approx(3e-5)  # YAML reads 3e-5 as text; we mean a float
    assert (job.train.batch_size, job.train.epochs, job.train.max_steps) == (16, 2.0, 100)
    assert job.scaling.use_gpu is True and job.scaling.gpus_per_worker == 0.5
    assert (job.run.output_dir, job.run.name, job.run.max_failures, job.run.checkpoint_every) == (
        "s3://bucket/prefix",
        "exp-1",
        3,
        25,
    )


def test_hub_source_and_loss_options_from_the_command_line():
    job = load_job(
        None,
        [
            "task=rerank",
            "data.train={hub: sentence-transformers/gooaq, split: train, select: 10, columns: {query: question, positive: answer}}",
            "train.loss=BinaryCrossEntropyLoss",
            "train.loss.pos_weight=3",
        ],
    )
    assert job.data.train.hub == "sentence-transformers/gooaq" and job.data.train.select == 10
    assert job.data.train.columns == {"query": "question", "positive": "answer"}
    assert job.loss.pos_weight == 3.0


def errors_of(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_job(None, overrides)
    return info.value.errors


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["task=nli", "train.learnig_rate=1e-5"], "train.learnig_rate: unknown key"),
        (["task=nli", "train.batch_size=big"], "train.batch_size: Input should be a valid integer"),
        (["task=translate"], "task: Input should be 'nli' or 'rerank'"),
        (["task=nli", "train.loss=ListNetLoss"], "train.loss: ListNetLoss does not fit task nli"),
        (["task=rerank", "train.loss=CrossEntropyLoss"], "train.loss: CrossEntropyLoss does not fit task rerank"),
        (["task=rerank", "model.num_labels=3"], "model.num_labels: a reranker scores each pair with 1 output"),
        (["task=nli", "model.num_labels=3", "model.labels=[a, b]"], "model.labels: 2 names for 3 labels"),
        (["task=nli", "train.batch_size=30", "scaling.num_workers=4"], "train.batch_size: 30 does not split evenly"),
        (["task=nli", "train.precision=fp16"], "train.precision: fp16 needs a GPU"),
        (["task=nli", "train.loss={name: CrossEntropyLoss, pos_weight: 2}"], "train.loss: option(s) pos_weight do not apply"),
        (["task=nli", "data.train={hub: x, path: y.parquet}"], "data.train: give exactly one of 'path'"),
        (["task=nli", "data.train=rows.txt"], "data.train: cannot tell the format"),
        (["task=nli", "train.max_steps=-5"], "train.max_steps: Input should be greater than or equal to -1"),
        (["task=nli", "run.name=has space"], "run.name: String should match pattern"),
        (["task=nli", "train.learning_rate"], "expected KEY=VALUE"),
        (["task=nli", "train.loss.class_weights=[1, 2]"], "train.loss.name: required"),
        (["task=rerank", "serve.model=x", "serve.models.a=y"], "serve: model and models are both set"),
        (["task=rerank", "serve.num_replicas=auto", "serve.min_replicas=3", "serve.max_replicas=2"],
         "serve: min_replicas (3) is larger than max_replicas (2)"),
    ],
)
def test_bad_configs_name_the_key(overrides, expected):
    errors = errors_of(overrides)
    assert any(expected in e for e in errors), errors
    assert all("\n" not in e for e in errors)  # one line per problem


def test_missing_and_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="job file not found"):
        load_job(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [nli\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- task\n")
    with pytest.raises(ConfigError, match="YAML mapping"):
        load_job(listy)


def test_every_key_is_documented():
    rows = describe_keys()
    keys = {k for k, _, _ in rows}
    for key in ("task", "model.name", "data.train", "train.loss", "train.max_steps", "scaling.gpus_per_worker", "run.checkpoint_every", "tune.search_space", "serve.max_documents"):
        assert key in keys
    undocumented = [k for k, _, desc in rows if not desc]
    assert not undocumented, undocumented


def test_cli_rejects_a_bad_config_fast_with_one_line_and_no_ray(tmp_path):
    """The error comes before any cluster work: no Ray session directory is created."""
    job = tmp_path / "job.yaml"
    job.write_text("task: rerank\ntrain: {loss: CrossEntropyLoss}\ndata: {train: a.parquet, eval: b.parquet}\n")
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "ce_ray.cli", "train", str(job), "--set", "run.output_dir=" + str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: train.loss: CrossEntropyLoss does not fit task rerank; use one of BinaryCrossEntropyLoss, "
        "MultipleNegativesRankingLoss, CachedMultipleNegativesRankingLoss, LambdaLoss, ListNetLoss, MSELoss, MarginMSELoss"
    ]
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()
    assert time.time() - started < 60


def test_cli_a_bad_data_path_found_during_the_run_prints_in_full_on_the_console(tmp_path):
    """Found after the console session began (stdout and stderr point at the run's log): still on the terminal."""
    import pandas as pd

    pd.DataFrame({"premise": ["a"], "hypothesis": ["b"], "label": [0]}).to_parquet(tmp_path / "dev.parquet")
    job = tmp_path / "job.yaml"
    job.write_text(f"task: nli\ndata: {{train: {tmp_path / 'missing.parquet'}, eval: {tmp_path / 'dev.parquet'}}}\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "ce_ray.cli", "train", str(job), "--set", f"run.output_dir={out}"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: data.train: file not found: {tmp_path / 'missing.parquet'}"]
    assert proc.stdout.splitlines()[0].startswith(f"ce-ray train {job}  (Ray, Hugging Face and worker logs: {out}/logs/console.log;")


def test_optuna_models_results_after_a_third_of_a_small_search():
    """Optuna's own default (10 random trials first) would make an 8-trial search random search."""
    from ce_ray.tuning.space import build_searcher, startup_trials

    def startup(*overrides):
        return startup_trials(load_job(None, ["task=rerank", *overrides]))

    assert startup("tune.num_samples=4") == 2
    assert startup("tune.num_samples=8") == 2
    assert startup("tune.num_samples=12") == 4
    assert startup("tune.num_samples=64") == 10
    assert startup("tune.num_samples=64", "tune.startup_trials=20") == 20
    searcher = build_searcher(load_job(None, ["task=rerank", "tune.num_samples=12"]), "eval_ndcg@10", "max", 1)
    assert searcher._sampler._n_startup_trials == 4  # what Optuna is actually given


def test_secrets_are_never_written(tmp_path):
    """serve.api_key is left out of every dict ce-ray writes or ships to workers, and of validate --show."""
    job = load_job(None, ["task=rerank", "serve.api_key=s3cr3t-key"])
    assert job.serve.api_key == "s3cr3t-key"
    assert job.to_dict()["serve"]["api_key"] is None
    assert job.to_dict(secrets=True)["serve"]["api_key"] == "s3cr3t-key"
    path = tmp_path / "job.yaml"
    path.write_text("task: rerank\nserve: {api_key: s3cr3t-key}\n")
    proc = subprocess.run([sys.executable, "-m", "ce_ray.cli", "validate", str(path), "--show"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "s3cr3t-key" not in proc.stdout + proc.stderr


def test_credentials_in_uris_are_refused_with_the_fix():
    with pytest.raises(ConfigError) as caught:
        load_job(None, ["task=nli", "run.output_dir=s3://bucket/runs?region=eu-west-1&secret_key=abc&access_key=x"])
    assert caught.value.errors == [
        "run.output_dir: credentials in the URI (access_key, secret_key) would be written into ce-ray's files and sent "
        "to every worker; remove them and set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or the GCS equivalent) in the "
        "environment, which ce-ray passes to Ray workers"
    ]
    load_job(None, ["task=nli", "run.output_dir=s3://bucket/runs?endpoint_override=http://127.0.0.1:9000"])  # no secret


def test_an_empty_api_key_on_the_command_line_is_refused():
    proc = subprocess.run(
        [sys.executable, "-m", "ce_ray.cli", "serve", "--model", "somewhere", "--api-key", ""],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --api-key: empty, which would serve without authentication; give a real key or leave it out"


def test_serve_models_from_repeated_name_equals_dir():
    from ce_ray.cli import _model_overrides

    job = load_job(None, _model_overrides(["legal=runs/legal/best", "medical=/m"]), base={"task": "rerank", "serve": {"model": "x"}})
    assert job.serve.model is None and job.serve.models == {"legal": "runs/legal/best", "medical": "/m"}
    assert load_job(None, _model_overrides(["runs/a"]), base={"task": "rerank"}).serve.model == "runs/a"
    for bad, message in (
        (["a=/x", "/y"], "name every model as NAME=DIR"),
        (["/x", "/y"], "give one DIR, or several as NAME=DIR"),
        (["a.b=/x"], "NAME without dots"),
        (["=/x"], "expected NAME=DIR"),
    ):
        with pytest.raises(ConfigError, match=message):
            _model_overrides(bad)
