"""What this process runs on: Ray (an existing cluster when there is one, else a local one on this machine) and
the hardware (:func:`native_bf16`, :func:`resolve_precision`). Imports nothing of ce-ray: data, training and serving
use it."""

from __future__ import annotations

import logging
import os

__all__ = ["PROPAGATED_ENV", "SETUP_HOOK", "cpu_flags", "ensure_ray", "native_bf16", "resolve_precision"]

logger = logging.getLogger(__name__)

# Settings a worker must share with the driver (offline mode, caches, log levels).
PROPAGATED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HF_HUB_CACHE",
    "SENTENCE_TRANSFORMERS_HOME",
    "TOKENIZERS_PARALLELISM",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "WANDB_API_KEY",
    "WANDB_PROJECT",
    "WANDB_MODE",
    "AWS_DEFAULT_REGION",
    "CE_RAY_HEADER_TIMEOUT_S",  # ce_ray.workarounds.uvicorn_157: read in Serve's proxies
)

# Run in every worker process of the Ray this process starts (Serve's proxies among them).
SETUP_HOOK = "ce_ray.workarounds.uvicorn_157.install"


def ensure_ray() -> None:
    """Connect to Ray once per process.

    Inside ``ray job submit`` (or with ``RAY_ADDRESS`` set) this joins that cluster and the job's
    runtime environment applies. Otherwise it starts a local Ray on this machine (token auth on,
    as Ray sets it up) and passes the Hugging Face offline/cache settings on to the workers.

    ``log_to_driver``: the workers' output, from every node, comes to this process; inside a
    :func:`ce_ray.console.session` it goes where stdout/stderr point, the run's log file.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(log_to_driver=True)
        return
    env_vars = {key: os.environ[key] for key in PROPAGATED_ENV if key in os.environ}
    # The dashboard stays on (127.0.0.1 only): Ray Train's cleanup actor queries actor state through it.
    ray.init(runtime_env={"env_vars": env_vars, "worker_process_setup_hook": SETUP_HOOK}, log_to_driver=True)


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``avx512_vnni``, ``amx_bf16``...) from /proc/cpuinfo; empty where there is none
    (not Linux: no cheap way to tell, so callers stay with what works everywhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


def native_bf16(use_gpu: bool) -> bool:
    """Whether this machine computes bf16 natively: a GPU with bf16, or a CPU with avx512_bf16/amx_bf16 (or Arm bf16)."""
    import platform

    import torch

    if use_gpu:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = cpu_flags()
    if {"avx512_bf16", "amx_bf16"} & flags:
        return True
    return platform.machine() in ("aarch64", "arm64") and "bf16" in flags


def resolve_precision(precision: str, use_gpu: bool) -> str:
    """A precision setting (``train.precision``, ``data.negatives.precision``) on this machine: ``auto`` = bf16 where
    it is native (:func:`native_bf16`), else fp32; anything else as given."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(use_gpu) else "fp32"
