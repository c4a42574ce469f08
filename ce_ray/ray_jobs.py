"""Submit ce-ray jobs to a running Ray cluster from Python: a thin layer over Ray's Jobs API.

Each function builds a :class:`ray.job_submission.JobSubmissionClient` and calls one of its
methods; the client does the work (uploading the working directory, authenticating, streaming logs).
What this module adds is the ``ce-ray`` entrypoint and the project's runtime environment
(``jobs/runtime_env.yaml``), so a job file runs on a cluster exactly as it runs locally.

The same thing from the shell::

    ray job submit --address http://127.0.0.1:8265 --runtime-env jobs/runtime_env.yaml \\
        -- ce-ray train jobs/nli_train.yaml --set run.output_dir=s3://my-bucket/ce-ray/nli

Example::

    from ce_ray import ray_jobs

    job_id = ray_jobs.submit("jobs/nli_train.yaml", overrides=["run.output_dir=s3://my-bucket/ce-ray/nli"],
                         address="http://127.0.0.1:8265")
    for chunk in ray_jobs.follow_logs(job_id, address="http://127.0.0.1:8265"):
        print(chunk, end="")
    ray_jobs.wait(job_id, timeout=3600, address="http://127.0.0.1:8265")  # JobStatus.SUCCEEDED

Addresses: ``address`` is the dashboard URL (``http://127.0.0.1:8265`` through ``ray dashboard
cluster.yaml``). Left out, Ray reads ``RAY_API_SERVER_ADDRESS`` or ``RAY_ADDRESS``; note that
Ray lets those variables override an explicit ``address``.

Token authentication (Ray >= 2.59 turns it on for local clusters; ``cluster.yaml`` and
``jobs/k8s/`` turn it on for theirs): the client sends the cluster's token when this process runs
with ``RAY_AUTH_MODE=token``, taking it from ``RAY_AUTH_TOKEN``, the file named by
``RAY_AUTH_TOKEN_PATH``, or ``~/.ray/auth_token``. Ray reads ``RAY_AUTH_MODE`` once, when ``ray``
is imported, so export it before starting Python. Or pass ``token=`` to send it explicitly as an
``Authorization: Bearer`` header. A missing or wrong token raises
``ray.exceptions.AuthenticationError``.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

__all__ = ["DEFAULT_RUNTIME_ENV", "client", "entrypoint", "follow_logs", "stop", "submit", "wait"]

DEFAULT_RUNTIME_ENV = "jobs/runtime_env.yaml"


def client(address: str | None = None, token: str | None = None) -> JobSubmissionClient:
    """A Jobs API client for the cluster at ``address`` (see the module docstring for address and token)."""
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def entrypoint(job_file: str, command: str = "train", overrides: Sequence[str] = ()) -> str:
    """The shell command a job runs, e.g. ``ce-ray train jobs/x.yaml --set a.b=1`` (each part quoted)."""
    words = ["ce-ray", command, job_file]
    for item in overrides:
        words += ["--set", item]
    return shlex.join(words)


def _runtime_env(runtime_env: dict[str, Any] | str | None) -> dict[str, Any] | None:
    if not isinstance(runtime_env, str):
        return runtime_env
    path = Path(runtime_env)
    if not path.is_file():
        raise FileNotFoundError(
            f"runtime_env: no file {runtime_env!r} (relative to {Path.cwd()}); run from the repository root, "
            "or pass a dict or None"
        )
    return yaml.safe_load(path.read_text()) or {}


def submit(
    job_file: str,
    command: str = "train",
    overrides: Sequence[str] = (),
    *,
    address: str | None = None,
    runtime_env: dict[str, Any] | str | None = DEFAULT_RUNTIME_ENV,
    token: str | None = None,
    **submit_kwargs: Any,
) -> str:
    """Submit ``ce-ray <command> <job_file> --set ...`` as a Ray job and return its submission id.

    Args:
        job_file: Job YAML, relative to the working directory the job runs in (``jobs/x.yaml``).
        command: The ``ce-ray`` subcommand: train, tune, serve, validate...
        overrides: ``KEY=VALUE`` items, each passed as ``--set KEY=VALUE``.
        address: Dashboard URL, e.g. ``http://127.0.0.1:8265``.
        runtime_env: A runtime_env dict, or a YAML file holding one (default ``jobs/runtime_env.yaml``;
            its ``working_dir: .`` uploads the current directory); None for none.
        token: Cluster token to send (default: Ray finds it, see the module docstring).
        **submit_kwargs: Passed on to ``JobSubmissionClient.submit_job``: ``submission_id``,
            ``entrypoint_num_cpus``, ``entrypoint_num_gpus``, ``entrypoint_resources``, ``metadata``.

    Raises:
        FileNotFoundError: ``runtime_env`` names a file that does not exist.
        ray.exceptions.AuthenticationError: the cluster refused the token (or got none).
    """
    return client(address, token).submit_job(
        entrypoint=entrypoint(job_file, command, overrides),
        runtime_env=_runtime_env(runtime_env),
        **submit_kwargs,
    )


def follow_logs(job_id: str, *, address: str | None = None, token: str | None = None) -> Iterator[str]:
    """Yield the job's output as it is written, from the start until the job ends.

    Like ``ray job logs --follow``. Runs its own event loop, so call it from plain (not async) code.
    """
    stream = client(address, token).tail_job_logs(job_id)
    loop = asyncio.new_event_loop()
    try:
        while True:
            try:
                yield loop.run_until_complete(anext(stream))
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(stream.aclose())
        loop.close()


def wait(
    job_id: str,
    timeout: float | None = None,
    *,
    address: str | None = None,
    token: str | None = None,
    poll_s: float = 0.5,
) -> JobStatus:
    """Block until the job ends and return its final status (SUCCEEDED, FAILED or STOPPED).

    Raises:
        TimeoutError: the job is still pending or running after ``timeout`` seconds (it keeps running).
    """
    jobs = client(address, token)
    deadline = None if timeout is None else time.monotonic() + timeout
    while not (status := jobs.get_job_status(job_id)).is_terminal():
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"job {job_id}: still {status.value} after {timeout:.0f}s")
        time.sleep(poll_s if left is None else min(poll_s, left))
    return status


def stop(job_id: str, *, address: str | None = None, token: str | None = None) -> bool:
    """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period); True if it was running."""
    return client(address, token).stop_job(job_id)
