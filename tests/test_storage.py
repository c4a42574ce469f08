"""ce_ray.storage on a local ``file://`` URI and on S3 (a moto server on 127.0.0.1), and a training run whose outputs go to S3.

The S3 side is a real HTTP endpoint: pyarrow's S3FileSystem talks to ``moto.server`` the way it
talks to AWS, pointed there by ``AWS_ENDPOINT_URL`` (the variable the AWS SDKs and pyarrow read).
Every test gets a bucket of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from ce_ray import storage

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on a free port of 127.0.0.1, for this module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch) -> dict[str, str]:
    """Credentials and endpoint for the moto server, set in this process (and handed to subprocesses)."""
    env = {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata lookups for credentials
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def bucket(s3_env) -> str:
    import boto3

    name = f"ce-ray-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["file", "s3"])
def base(request, tmp_path) -> str:
    """A fresh, empty location: ``file:///tmp/...`` or ``s3://<bucket>/runs``."""
    if request.param == "file":
        return f"file://{tmp_path}/runs"
    return f"s3://{request.getfixturevalue('bucket')}/runs"


def _tree(root: Path) -> dict[str, str]:
    """{relative path: text} of every file under ``root``."""
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _listing(uri: str) -> list[str]:
    """Names directly under ``uri`` (files and directories)."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem_and_path(uri)
    return sorted(info.base_name for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)))


# --------------------------------------------------------------------------------------------
# locations
# --------------------------------------------------------------------------------------------
def test_local_paths_and_file_uris_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.is_local("runs/nli") and storage.is_local("file:///data/runs")
    assert not storage.is_local("s3://bucket/runs") and not storage.is_local("gs://bucket/runs")
    assert storage.resolve_uri("runs/nli") == str(tmp_path / "runs" / "nli")
    assert storage.resolve_uri("file:///data/runs") == "/data/runs"
    assert storage.resolve_uri("s3://bucket/runs/") == "s3://bucket/runs"


def test_join_keeps_the_scheme():
    assert storage.join("s3://bucket/runs/", "final", "/config.json") == "s3://bucket/runs/final/config.json"
    assert storage.join("gs://bucket/runs", "summary.json") == "gs://bucket/runs/summary.json"
    assert storage.join("file:///data/runs", "workers", "rank0.json") == "/data/runs/workers/rank0.json"


def test_join_keeps_a_query_string_at_the_end():
    uri = "s3://bucket/runs?endpoint_override=http://127.0.0.1:9000"
    assert storage.join(uri, "final") == "s3://bucket/runs/final?endpoint_override=http://127.0.0.1:9000"


# --------------------------------------------------------------------------------------------
# files and directories, locally and on S3
# --------------------------------------------------------------------------------------------
def test_json_round_trip(base):
    uri = storage.join(base, "summary.json")
    assert not storage.exists(uri) and storage.stat_fingerprint(uri) == {}

    storage.write_json(uri, {"task": "nli", "nodes": ["a", "b"]})

    assert storage.exists(uri)
    assert storage.read_json(uri) == {"task": "nli", "nodes": ["a", "b"]}
    assert storage.stat_fingerprint(uri)["size"] > 0
    assert _listing(base) == ["summary.json"], "no temporary file left beside it"


def test_publish_dir_copies_a_tree_and_replaces_an_older_one(base, tmp_path):
    model = tmp_path / "model"
    (model / "tokenizer").mkdir(parents=True)
    (model / "config.json").write_text('{"v": 1}')
    (model / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    dest = storage.join(base, "final")

    assert storage.publish_dir(str(model), dest) == storage.resolve_uri(dest)
    assert _tree(Path(storage.download_dir(dest, str(tmp_path / "copy1")))) == _tree(model)

    # A second publish replaces the first: old files are gone, nothing half-written remains.
    (model / "config.json").write_text('{"v": 2}')
    (model / "tokenizer" / "vocab.txt").unlink()
    (model / "model.safetensors").write_text("weights")
    storage.publish_dir(str(model), dest)

    copy = _tree(Path(storage.download_dir(dest, str(tmp_path / "copy2"))))
    assert copy == {"config.json": '{"v": 2}', "model.safetensors": "weights"}
    assert _listing(base) == ["final"], "no temporary or old copies left beside it"


def test_republishing_on_s3_switches_a_pointer_so_readers_always_find_a_whole_model(bucket, tmp_path):
    """A new version is uploaded whole, then one PUT switches the pointer: a publish that dies before the
    switch leaves readers the old, complete model; the node cache is keyed by content, so a new version is
    downloaded again; the version before stays for readers mid-download, older ones go."""
    import pyarrow.fs as pafs

    model = tmp_path / "model"
    model.mkdir()
    dest = f"s3://{bucket}/runs/best"
    versions = []
    for v in (1, 2, 3):
        (model / "config.json").write_text(f'{{"v": {v}}}')
        storage.publish_dir(str(model), dest)
        versions.append(storage.current(dest))
        assert _tree(Path(storage.download_dir(dest))) == {"config.json": f'{{"v": {v}}}'}  # not a stale cache
    assert _listing(dest) == [storage.POINTER, "_v"]
    assert _listing(f"{dest}/_v") == sorted(v.rsplit("/", 1)[1] for v in versions[1:])

    # a publish that crashes after uploading, before the switch: readers still get version 3, whole
    (model / "config.json").write_text('{"v": 4}')
    fs, path = storage.filesystem_and_path(f"{dest}/_v/half-written")
    pafs.copy_files(str(model), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    assert storage.current(dest) == versions[-1]
    assert _tree(Path(storage.download_dir(dest))) == {"config.json": '{"v": 3}'}


def test_download_dir_fetches_a_directory_of_plain_files(bucket, tmp_path):
    """What every worker does with the prepared data when run.output_dir is on S3."""
    dataset = tmp_path / "train"
    dataset.mkdir()
    (dataset / "data-00000-of-00001.arrow").write_text("rows")
    (dataset / "state.json").write_text("{}")
    uri = f"s3://{bucket}/runs/data/train-0123"
    storage.publish_dir(str(dataset), uri)

    local = storage.download_dir(uri, str(tmp_path / "cache" / "train-0123"))

    assert _tree(Path(local)) == _tree(dataset)


def test_download_dir_of_a_local_directory_is_the_directory_itself(tmp_path):
    (tmp_path / "ds").mkdir()
    assert storage.download_dir(f"file://{tmp_path}/ds") == str(tmp_path / "ds")


def test_s3_endpoint_can_also_come_from_the_uri(bucket, s3_env, monkeypatch):
    """pyarrow's ?endpoint_override= reaches the same bucket without AWS_ENDPOINT_URL."""
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    uri = f"s3://{bucket}/runs/summary.json?endpoint_override={s3_env['AWS_ENDPOINT_URL']}"
    storage.write_json(uri, {"ok": True})
    assert storage.read_json(uri) == {"ok": True}


# --------------------------------------------------------------------------------------------
# a training run with its outputs on S3
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_writes_its_outputs_to_s3(bucket, s3_env, tiny_model, nli_files, tmp_path):
    """``ce-ray train`` (run_training in its own process, with a local Ray of its own) to s3://."""
    out = f"s3://{bucket}/ce-ray/nli-tiny"
    job = {
        "task": "nli",
        "model": {"name": tiny_model},
        "data": {"train": nli_files["train"], "eval": nli_files["dev"]},
        "train": {"batch_size": 8, "max_steps": 2},
        "scaling": {"num_workers": 1},
        "run": {"output_dir": out, "name": "tiny", "checkpoint_every": 2},
    }
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_JOB_ID")}
    env.update(s3_env, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")

    result = subprocess.run(
        [str(BIN / "ce-ray"), "train", str(job_file)], check=False, env=env, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    summary = storage.read_json(f"{out}/summary.json")
    assert summary["final_model"] == f"{out}/final"
    assert summary["steps_per_worker"] == [2]
    assert {"config.json", "model.safetensors"} <= set(_listing(storage.current(f"{out}/final")))
    assert any(name.startswith("checkpoint_") for name in _listing(f"{out}/tiny")), "Ray Train's checkpoints"
    assert _listing(f"{out}/workers") == ["rank0.json"]
