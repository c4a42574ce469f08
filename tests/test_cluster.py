"""ce-ray on a real multi-node Ray cluster (two nodes on this machine), and the cluster configs that ship.

The fast tests check the shipped configs: ``cluster.yaml`` passes Ray's own cluster-launcher
validation, the KubeRay manifests have the kinds and fields KubeRay needs, and
``jobs/runtime_env.yaml`` uploads the repository.

The slow tests start a head node (2 CPUs) and a worker node (1 CPU), each a ``ray start --block``
process with its own temp dir and ports (no Ray default port, so other Ray instances on the
machine are left alone) and token authentication on, then drive ce-ray jobs through the Jobs API
the way the README's 'From laptop to cluster' does:

1. A client with a wrong token is refused.
2. ``ray job submit --runtime-env jobs/runtime_env.yaml`` runs a ce-ray command (the CLI finds the
   token through Ray's variables); ``ce_ray.ray_jobs`` follows its logs and waits for it.
3. A 2-worker training job with ``scaling.placement_strategy=SPREAD`` and ``run.max_failures=2``
   runs one worker on each node. Once its first checkpoint is recorded in storage, the worker
   node's raylet is killed by pid; the job still finishes (Ray Train restarts both workers on the
   head from that checkpoint) and writes ``summary.json`` and ``final/`` to a ``file://``
   directory both nodes see. (One job does both, placement and failure, to keep the file under
   4 minutes on 2 cores.)
4. ``ce_ray.ray_jobs.stop`` stops a running job.
5. ``serve deploy`` of jobs/serve.yaml, then of the same file with a new model, swaps the model while 8
   clients get 200.

One more cluster, its head with no CPUs for tasks, runs a 20k-pair rerank job with ``data.prepare_on:
cluster``: the preparation (a task and Ray Data actors) can only land on the worker node.

Teardown ends every process the cluster started, by pid.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from ce_ray import ray_jobs
from ce_ray.config import load_job
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # this environment's `ray` and `ce-ray`


# --------------------------------------------------------------------------------------------
# the shipped configs
# --------------------------------------------------------------------------------------------
def _load_yaml(path: str) -> Any:
    return yaml.safe_load((REPO / path).read_text())


def _overrides(words: list[str]) -> list[str]:
    """The KEY=VALUE items of a ce-ray command's ``--set`` flags."""
    return [item for flag, item in itertools.pairwise(words) if flag == "--set"]


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does before it talks to AWS: fill in the AWS defaults, then check the schema.
    config = prepare_config(copy.deepcopy(_load_yaml("cluster.yaml")))
    validate_config(config)

    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu_types and all(t["resources"]["GPU"] >= 1 for t in gpu_types)
    for t in gpu_types:
        assert t["node_config"]["InstanceType"].startswith(("g5.", "g6.")), t["node_config"]["InstanceType"]
        assert t["min_workers"] == 0 and t["max_workers"] >= 1, "workers scale from zero"
        assert "IamInstanceProfile" in t["node_config"], "workers need S3 access for checkpoints"
    setup = "\n".join(config["setup_commands"])
    assert "download.pytorch.org/whl/cu" in setup, "a CUDA build of torch"
    assert "ce-ray" in setup and "ray[" in setup


def test_cluster_yaml_keeps_the_dashboard_private_and_token_auth_on():
    config = _load_yaml("cluster.yaml")
    head_start = " ".join(config["head_start_ray_commands"])
    worker_start = " ".join(config["worker_start_ray_commands"])
    # Reachable only through `ray dashboard cluster.yaml` (SSH to the head's localhost) ...
    assert "--dashboard-host=127.0.0.1" in head_start
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert not rule["FromPort"] <= 8265 <= rule["ToPort"], "never open the dashboard port"
    # ... and every node requires the token, which file_mounts copies to each node.
    assert "RAY_AUTH_MODE=token" in head_start and "RAY_AUTH_MODE=token" in worker_start
    commands = " ".join(
        config["setup_commands"] + config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    )
    assert "RAY_AUTH_MODE=disabled" not in commands
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_kuberay_rayjob_runs_the_tune_job():
    (job,) = yaml.safe_load_all((REPO / "jobs/k8s/rayjob-tune.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    command = shlex.split(spec["entrypoint"])
    assert command[:3] == ["ce-ray", "tune", "jobs/rerank_tune.yaml"]
    job_config = load_job(REPO / command[2], _overrides(command))  # a valid job: every key exists, every value fits
    assert job_config.run.output_dir.startswith("s3://") and job_config.scaling.use_gpu
    train = job_config.data.train  # the shipped tune job trains on two sources, each pointed at the bucket
    assert [source.path.rsplit("/", 1)[-1] for source in train] == ["train.parquet", "extra.parquet"]
    assert all(source.path.startswith("s3://") for source in [*train, job_config.data.eval, job_config.data.test])
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    assert spec["shutdownAfterJobFinishes"] is True
    _check_ray_cluster_spec(spec["rayClusterSpec"])


def test_kuberay_rayservice_serves_the_app():
    from ce_ray.config import ServeConfig

    (service,) = yaml.safe_load_all((REPO / "jobs/k8s/rayservice-serve.yaml").read_text())
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    app, health = serve_config["applications"]
    assert app["import_path"] == "ce_ray.serving:app_builder"
    ServeConfig.model_validate(app["args"])  # the args are the serve: section of a job
    assert (health["name"], health["route_prefix"], health["args"]) == (app["name"] + "-health", "/health", app["args"])
    assert serve_config["http_options"]["host"] == "0.0.0.0", "the K8s Service must reach the proxy"
    _check_ray_cluster_spec(service["spec"]["rayClusterConfig"])


def _check_ray_cluster_spec(spec: dict) -> None:
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["maxReplicas"]
        (worker,) = group["template"]["spec"]["containers"]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_runtime_env_uploads_the_repository_without_local_state():
    env = _load_yaml("jobs/runtime_env.yaml")
    assert env["working_dir"] == "."
    for local_state in (".venv/", ".git/", "runs/"):
        assert local_state in env["excludes"]
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values()), "Ray wants string env values"


def test_every_ce_ray_command_in_the_cluster_docs_is_a_valid_job():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## From laptop to cluster", 1)[1].split("\n## ", 1)[0]
    text = section.replace("\\\n", " ")  # join continued lines
    commands = re.findall(r"ce-ray (?:train|tune) jobs/\S+\.yaml[^\n`]*", text)
    assert len(commands) >= 3
    for command in commands:
        words = shlex.split(command)
        load_job(REPO / words[2], _overrides(words))  # raises ConfigError naming a wrong key or value


def test_entrypoint_is_the_ce_ray_command_with_quoted_overrides():
    command = ray_jobs.entrypoint("jobs/nli_train.yaml", "train", ["run.name=a b", "scaling.num_workers=2"])
    assert command == "ce-ray train jobs/nli_train.yaml --set 'run.name=a b' --set scaling.num_workers=2"


# --------------------------------------------------------------------------------------------
# a two-node cluster on this machine
# --------------------------------------------------------------------------------------------
def _wait_for(condition: Callable[[], Any], timeout: float, what: str, abort: Callable[[], str | None] = lambda: None):
    """Poll ``condition`` until it returns something truthy, and return that.

    Fails after ``timeout`` seconds, or as soon as ``abort`` returns a reason to stop waiting.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        reason = abort()
        if reason:
            pytest.fail(f"gave up waiting for {what}: {reason}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


class LocalCluster:
    """A head node and a worker node on this machine, each a ``ray start --block`` process.

    Token auth is on with a token of the cluster's own (``RAY_AUTH_MODE=token`` and
    ``RAY_AUTH_TOKEN_PATH``, Ray's documented variables). Jobs inherit the nodes' environment:
    offline Hugging Face hub, this environment's ``bin/`` first on PATH.
    """

    def __init__(self, root: Path, head_cpus: int = 2, worker_cpus: int = 1):
        self.root = root
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.token = secrets.token_hex(32)
        token_file = root / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        env = dict(os.environ)
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN"):
            env.pop(key, None)
        env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token_file),
            # Ray Train asks the dashboard about its actors and, with several Ray instances on one
            # machine, cannot tell which one is its own: name it.
            RAY_API_SERVER_ADDRESS=self.address,
            RAY_USAGE_STATS_ENABLED="0",
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        self.env = env
        self.nodes: dict[str, subprocess.Popen] = {}
        self._seen: dict[int, psutil.Process] = {}

    # starting ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._start_node(
            "head",
            "--head",
            f"--port={self.gcs_port}",
            f"--num-cpus={self.head_cpus}",  # 2: room for both training workers once the worker node is gone
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
        )
        _wait_for(self._gcs_listening, 90, "the head's GCS", abort=self._exited)
        self._start_node("worker", f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={self.worker_cpus}")
        self.wait_for_nodes(2, timeout=90)

    def _start_node(self, name: str, *args: str) -> None:
        command = [
            str(BIN / "ray"), "start", "--block", *args,
            "--num-gpus=0",
            f"--temp-dir={self.root / name}",
            f"--dashboard-agent-listen-port={free_port()}",
            "--min-worker-port=0", "--max-worker-port=0",  # OS-chosen ports for Ray's workers
            "--object-store-memory=200000000",
            "--disable-usage-stats",
        ]  # fmt: skip
        with open(self.root / f"{name}.log", "wb") as log:
            self.nodes[name] = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")[-3000:]

    # looking --------------------------------------------------------------------------------
    def _api(self, path: str) -> Any:
        request = urllib.request.Request(self.address + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def node_states(self) -> dict[str, dict]:
        """node id -> the state API's record of it (state, is_head_node, ...)."""
        nodes = self._api("/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
        return {n["node_id"]: n for n in nodes}

    def node_ids(self) -> dict[str, str]:
        """``{"head": id, "worker": id}`` of the nodes alive now."""
        alive = [n for n in self.node_states().values() if n["state"] == "ALIVE"]
        return {("head" if n["is_head_node"] else "worker"): n["node_id"] for n in alive}

    def _gcs_listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.gcs_port)) == 0

    def _exited(self) -> str | None:
        for name, proc in self.nodes.items():
            if proc.poll() is not None:
                return f"`ray start` for the {name} node exited ({proc.returncode}):\n{self.log(name)}"
        return None

    def wait_for_nodes(self, count: int, timeout: float) -> None:
        def alive() -> bool:
            try:
                return len(self.node_ids()) == count
            except OSError:  # the dashboard is not up yet
                return False

        _wait_for(alive, timeout, f"{count} live Ray node(s)", abort=self._exited)

    def processes(self, name: str) -> list[psutil.Process]:
        """The node's ``ray start`` process and everything below it (raylet, agents, workers, drivers)."""
        try:
            root = psutil.Process(self.nodes[name].pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
        self._seen.update((p.pid, p) for p in tree)
        return tree

    def raylet(self, name: str) -> psutil.Process:
        (raylet,) = [p for p in self.processes(name) if p.name() == "raylet"]
        return raylet

    def job_logs(self, job_id: str) -> str:
        return ray_jobs.client(self.address, self.token).get_job_logs(job_id)[-6000:]

    # stopping -------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """End every process this cluster started, by pid (SIGKILL), and remove its files."""
        for name in self.nodes:
            self.processes(name)
        marker = f"{self.root}/"
        for proc in psutil.process_iter(["cmdline"]):  # anything that left the tree (orphaned workers)
            if marker in " ".join(proc.info["cmdline"] or ()):
                self._seen[proc.pid] = proc
        # SIGKILL at once: nothing of a test cluster needs a graceful end (some Ray processes ignore SIGTERM anyway)
        alive = [p for p in self._seen.values() if p.pid != os.getpid() and p.is_running()]
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(alive, timeout=10)
        assert not alive, f"processes survived SIGKILL: {[p.pid for p in alive]}"
        for proc in self.nodes.values():
            proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(prefix: str, **cpus: int):
    # A short root: Ray's unix sockets live under it (paths are capped at 107 bytes).
    c = LocalCluster(Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp")), **cpus)
    with pytest.MonkeyPatch.context() as mp:
        # Ray lets these override the address a JobSubmissionClient is given.
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.delenv("RAY_API_SERVER_ADDRESS", raising=False)
        try:
            c.start()
            yield c
        finally:
            c.shutdown()


@pytest.fixture(scope="module")
def cluster():
    with running_cluster("cer") as c:
        yield c


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> Path:
    """The "shared storage" of the cluster: a directory every node sees (used as file://...)."""
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def job_file(shared, tiny_model, nli_files) -> Path:
    """A small 2-worker NLI job; each test points run.output_dir/run.name at its own place."""
    from ce_ray.config import ScalingConfig

    if "placement_strategy" not in ScalingConfig.model_fields:
        pytest.fail(
            "needs scaling.placement_strategy (PACK|SPREAD|STRICT_PACK|STRICT_SPREAD) in ce_ray/config.py, "
            "passed to ray.train.ScalingConfig(placement_strategy=...) in ce_ray/training/driver.py"
        )
    job = {
        "task": "nli",
        "model": {"name": tiny_model},
        "data": {"train": nli_files["train"], "eval": nli_files["dev"], "cache_dir": str(shared / "data")},
        "train": {"batch_size": 16, "max_steps": 2},
        "scaling": {"num_workers": 2, "placement_strategy": "SPREAD"},
        "run": {"output_dir": f"file://{shared}/default", "name": "default", "checkpoint_every": 2},
    }
    path = shared / "nli_2workers.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _runtime_env() -> dict:
    """jobs/runtime_env.yaml as `ray job submit --runtime-env` reads it from the repository root."""
    return {**_load_yaml("jobs/runtime_env.yaml"), "working_dir": str(REPO)}


def _read_run(out: Path, summary: bool = True) -> tuple[dict | None, list[dict]]:
    """A run's summary.json (when asked) and its workers/rank*.json."""
    ranks = [json.loads(p.read_text()) for p in sorted((out / "workers").glob("rank*.json"))]
    return (json.loads((out / "summary.json").read_text()) if summary else None), ranks


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


# --------------------------------------------------------------------------------------------
# jobs on the cluster
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def cpu_less_head(tmp_path_factory):
    """A cluster whose head offers no CPUs for tasks (as a small head node should): work must land on the worker.
    Function-scoped and first in the file, so it is gone before the module's `cluster` starts."""
    with running_cluster("cerh", head_cpus=0, worker_cpus=2) as c:
        yield c


@pytest.mark.slow
def test_a_20k_pair_job_prepares_on_the_worker_node_and_trains_from_what_it_wrote(cpu_less_head, tiny_model, tmp_path):
    """data.prepare_on: cluster. The driver (the job's entrypoint, on the head) holds only metadata: the preparation
    task and its Ray Data actors can only run on the worker, since the head has no CPUs. The negatives are the driver
    path's, up to ties in score."""
    import random

    import pandas as pd

    from ce_ray.data import load_prepared, prepare_split
    from conftest import assert_same_negatives

    cluster, auth = cpu_less_head, {"address": cpu_less_head.address, "token": cpu_less_head.token}
    rng = random.Random(0)
    words = [f"w{i}" for i in range(5000)]
    text = lambda n: " ".join(rng.choices(words, k=n))  # noqa: E731
    pd.DataFrame({"question": [text(8) for _ in range(20_000)], "answer": [text(24) for _ in range(20_000)]}).to_parquet(
        tmp_path / "pairs.parquet"
    )
    pd.DataFrame({"query": [text(8) for _ in range(16)], "positive": [[text(24)] for _ in range(16)],
                  "negative": [[text(24), text(24)] for _ in range(16)]}).to_parquet(tmp_path / "eval.parquet")  # fmt: skip
    job = {
        "task": "rerank",
        "model": {"name": tiny_model, "max_length": 64},
        "data": {
            "train": {"path": str(tmp_path / "pairs.parquet"), "columns": {"query": "question", "positive": "answer"}},
            "eval": str(tmp_path / "eval.parquet"),
            "prepare_on": "cluster",
            # the tiny random encoder scores everything alike: no score filters, the top candidates
            "negatives": {"model": tiny_model, "num": 3, "sampling": "top", "max_score": None, "relative_margin": None,
                          "precision": "fp32"},  # bf16 may swap near-ties
        },
        "train": {"loss": "LambdaLoss", "batch_size": 8, "max_steps": 2},
        "eval": {"baseline": "none"},
        "run": {"output_dir": f"file://{tmp_path / 'out'}", "name": "prep", "checkpoint_every": 2},
    }
    path = tmp_path / "prepare.yaml"
    path.write_text(yaml.safe_dump(job))
    job_id = ray_jobs.submit(str(path), "train", runtime_env=None, **auth)
    status = ray_jobs.wait(job_id, timeout=600, poll_s=0.5, **auth)
    logs = cluster.job_logs(job_id)
    assert status.value == "SUCCEEDED", logs

    nodes = cluster.node_ids()
    (meta,) = (tmp_path / "out" / "data").glob("train-*/ce_ray_split.json")
    split = json.loads(meta.read_text())
    assert split["prepared_on"] == {"path": "cluster", "node": nodes["worker"]} and split["rows"] == 20_000
    # the driver's console shows the task's progress (the queue's lines, not the task's log)
    assert re.search(r"prepare: embedded 40,000/40,000 texts on 2 actor\(s\), [0-9,]+ texts/s, ETA 0s", logs), logs
    assert "prepare: searched 20,000/20,000 queries" in logs, logs
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train_rows"] == 20_000 and summary["nodes"] == [nodes["worker"]]
    assert _is_model_dir(tmp_path / "out" / "final")
    # eval.baseline: none turns the retriever baseline off: no baseline, no verdict, nothing for a server to warn of
    from ce_ray.serving import quality_warning

    assert summary["baseline"] is None and summary["verdict"] is None and summary["fusion"] is None
    assert quality_warning(str(tmp_path / "out" / "final")) is None

    # the driver path, here, on the same rows: the same negatives up to ties
    from ce_ray.config import load_job

    local = load_job(path, [f"run.output_dir={tmp_path / 'driver'}", "data.prepare_on=driver"])
    driver = prepare_split(local, "train")
    a = load_prepared(driver.uri).data.table.to_pydict()
    b = load_prepared(str(meta.parent)).data.table.to_pydict()
    assert meta.parent.name == driver.uri.rsplit("/", 1)[-1], "the same cache key on both paths"
    assert sum(1 for labels in b["labels"] if 0.0 in labels) == 20_000
    assert assert_same_negatives(a, b, tiny_model) <= 200  # near-ties of a random encoder, each checked


@pytest.mark.slow
def test_jobs_api_refuses_a_wrong_token(cluster):
    from ray.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError):
        ray_jobs.client(cluster.address, token="not-the-cluster-token").list_jobs()
    assert ray_jobs.client(cluster.address, token=cluster.token).list_jobs() is not None


@pytest.mark.slow
def test_cli_submit_with_the_runtime_env_file_then_follow_from_python(cluster, job_file):
    # Ray's CLI as the README runs it, from the repository root; it finds the token through
    # Ray's variables (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH) in the environment.
    submission_id = f"validate-{secrets.token_hex(4)}"
    submit = subprocess.run(
        [
            str(BIN / "ray"), "job", "submit", "--no-wait",
            "--address", cluster.address,
            "--runtime-env", "jobs/runtime_env.yaml",
            "--submission-id", submission_id,
            "--", "ce-ray", "validate", str(job_file),
        ],
        check=False, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert submit.returncode == 0, submit.stdout + submit.stderr

    auth = {"address": cluster.address, "token": cluster.token}
    output = "".join(ray_jobs.follow_logs(submission_id, **auth))  # returns when the job ends
    assert f"{job_file}: valid" in output
    assert ray_jobs.wait(submission_id, timeout=30, **auth).value == "SUCCEEDED"


@pytest.mark.slow
def test_serve_deploy_of_an_updated_serve_yaml_swaps_the_model_while_8_clients_get_200(cluster, shared, tiny_model):
    """jobs/serve.yaml, deployed with Ray's `serve deploy` onto the running cluster, then deployed again with a new
    `model:`: Serve rolls the replicas over (max_surge_percent: new ones pass health before old ones stop) and
    8 clients sending all the while get 200 every time; once /info shows only the new version, scores are its.
    Before the other Serve test: `serve deploy` sets the HTTP port of a Serve that is not running yet, and
    `serve shutdown` at the end leaves none running."""
    import httpx

    from ce_ray.modeling import content_hash
    from test_serve_update import CLIENTS, Clients, _expected, _reranker

    old = _reranker(tiny_model, shared / "deploy-v1" / "model-a", seed=0)
    new = _reranker(tiny_model, shared / "deploy-v2" / "model-b", seed=1)
    want_old, want_new = _expected(old), _expected(new)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = _load_yaml("jobs/serve.yaml")
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args.update(model=old, model_name="model-a", num_cpus=0.5, backend="torch", precision="fp32")
    path = shared / "serve-deploy.yaml"

    def deploy() -> None:
        path.write_text(yaml.safe_dump(config))  # the health app shares the args (a YAML anchor): the same dict
        done = subprocess.run([str(BIN / "serve"), "deploy", str(path), "--address", cluster.address], env=cluster.env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    def serving(version: str) -> dict | None:
        try:
            info = httpx.get(f"{url}/info", timeout=10).json()
        except (httpx.HTTPError, ValueError):
            return None
        versions = [(v["version"], v["replicas"]) for m in info.get("models", []) for v in m["versions"]]
        return info if versions == [(version, 1)] else None

    deploy()
    try:
        _wait_for(lambda: serving(content_hash(old)), 240, "the app from jobs/serve.yaml", abort=cluster._exited)
        clients = Clients(url)
        clients.wait_for(CLIENTS)
        update_started = time.monotonic()
        args["model"] = new
        deploy()  # the same file with a new model:
        _wait_for(lambda: serving(content_hash(new)), 240, "only the new version to serve", abort=cluster._exited)
        updated = time.monotonic()
        clients.wait_for(2 * CLIENTS, sent_after=updated)
        answers = clients.stop()
    finally:
        subprocess.run([str(BIN / "serve"), "shutdown", "-y", "--address", cluster.address], env=cluster.env,
                       capture_output=True, timeout=120)  # fmt: skip

    assert [(status, body) for _, _, status, body in answers if status != 200] == []
    before = [scores for sent, done, _, scores in answers if done < update_started]
    after = [scores for sent, _, _, scores in answers if sent > updated]
    assert before and before == [pytest.approx(want_old, abs=1e-5)] * len(before)
    assert len(after) >= 2 * CLIENTS and after == [pytest.approx(want_new, abs=1e-5)] * len(after)


@pytest.mark.slow
def test_serve_places_replicas_on_both_nodes_and_requests_reach_both(cluster, shared, tiny_model):
    """`ce-ray serve` as a job: two model replicas, at most one per node, and requests through the head's
    proxy are answered by both."""
    import httpx

    auth = {"address": cluster.address, "token": cluster.token}
    port = free_port()
    job = {
        "task": "rerank",
        "serve": {
            "model": tiny_model, "port": port, "num_replicas": 2, "num_cpus": 0.5, "max_replicas_per_node": 1,
            "proxy_location": "HeadOnly",  # both nodes share this machine's ports: one proxy
            "backend": "torch",
        },
    }  # fmt: skip
    path = shared / "serve.yaml"
    path.write_text(yaml.safe_dump(job))
    job_id = ray_jobs.submit(str(path), "serve", runtime_env=_runtime_env(), **auth)
    url = f"http://127.0.0.1:{port}"

    def job_ended() -> str | None:
        status = ray_jobs.client(**auth).get_job_status(job_id)
        return f"the job is {status.value}:\n{cluster.job_logs(job_id)}" if status.is_terminal() else None

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        _wait_for(healthy, 180, "the served app", abort=job_ended)
        body = {"query": "capital of Germany", "documents": ["Berlin is the capital.", "Bananas are yellow."] * 4}

        def both_answered() -> list[dict] | None:
            with httpx.Client(timeout=30) as http:
                assert all(http.post(f"{url}/rerank", json=body).status_code == 200 for _ in range(8))
            replicas = httpx.get(f"{url}/info", timeout=30).json()["replicas"]
            return replicas if len(replicas) == 2 and all(r["requests"] > 0 for r in replicas) else None

        replicas = _wait_for(both_answered, 120, "requests answered by both replicas", abort=job_ended)
        assert sorted(r["node_id"] for r in replicas) == sorted(cluster.node_ids().values())
    finally:
        ray_jobs.stop(job_id, **auth)
        assert ray_jobs.wait(job_id, timeout=60, poll_s=0.5, **auth).is_terminal()


@pytest.mark.slow
def test_two_workers_span_two_nodes_and_survive_losing_one(cluster, job_file, shared):
    auth = {"address": cluster.address, "token": cluster.token}
    out = shared / "fault"
    nodes = cluster.node_ids()
    assert set(nodes) == {"head", "worker"}

    # 1. A 2-worker job, SPREAD over the nodes, allowed 2 restarts, outputs on shared storage.
    job_id = ray_jobs.submit(
        str(job_file),
        "train",
        [f"run.output_dir=file://{out}", "run.name=fault", "run.max_failures=2", "train.max_steps=24"],
        runtime_env=_runtime_env(),
        **auth,
    )

    # 2. Wait until Ray Train has recorded a checkpoint in storage (its snapshot names a
    #    checkpoint directory that exists): a restart resumes from there.
    def recorded_checkpoint() -> bool:
        snapshot = out / "fault" / "checkpoint_manager_snapshot.json"
        if not snapshot.is_file():
            return False
        text = snapshot.read_text()
        return any(d.name in text for d in (out / "fault").glob("checkpoint_*"))

    def job_ended() -> str | None:
        status = ray_jobs.client(**auth).get_job_status(job_id)
        return f"the job is {status.value}:\n{cluster.job_logs(job_id)}" if status.is_terminal() else None

    _wait_for(recorded_checkpoint, 180, "the first checkpoint in storage", abort=job_ended)

    # 3. The workers run on different nodes: each wrote its node id when it started.
    _, running = _read_run(out, summary=False)
    assert sorted(r["node_id"] for r in running) == sorted(nodes.values()), running

    # 4. The worker node dies: its raylet is killed (SIGKILL, by pid), the node's workers with it.
    raylet = cluster.raylet("worker")
    raylet.kill()
    raylet.wait(timeout=30)

    # 5. The job still succeeds: both workers restart on the head from the checkpoint, and the
    #    summary and final model land in the shared storage.
    status = ray_jobs.wait(job_id, timeout=240, poll_s=0.5, **auth)
    assert status.value == "SUCCEEDED", cluster.job_logs(job_id)
    summary, ranks = _read_run(out)
    assert summary["world_size"] == 2
    assert summary["nodes"] == [nodes["head"]]
    assert summary["steps_per_worker"] == [24, 24]
    assert len(ranks) == 2 and all(r["resumed"] for r in ranks), ranks
    assert all(r["steps_this_attempt"] < r["global_step"] for r in ranks), "resumed mid-run, not from scratch"
    assert _is_model_dir(out / "final")
    assert cluster.node_states()[nodes["worker"]]["state"] == "DEAD"


@pytest.mark.slow
def test_stop_ends_a_running_job(cluster, job_file, shared):
    auth = {"address": cluster.address, "token": cluster.token}
    # runtime_env=None: the job runs the ce-ray installed on the nodes, nothing uploaded.
    job_id = ray_jobs.submit(
        str(job_file),
        "train",
        [f"run.output_dir=file://{shared}/stopped", "train.max_steps=500"],
        runtime_env=None,
        **auth,
    )
    _wait_for(lambda: ray_jobs.client(**auth).get_job_status(job_id).value == "RUNNING", 60, "the job to run")
    assert ray_jobs.stop(job_id, **auth) is True
    assert ray_jobs.wait(job_id, timeout=60, poll_s=0.5, **auth).value == "STOPPED"
