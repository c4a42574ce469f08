"""Connecting to Ray: an existing cluster when there is one, else a local one on this machine."""

from __future__ import annotations

import logging
import os

__all__ = ["PROPAGATED_ENV", "ensure_ray"]

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
)


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
    ray.init(runtime_env={"env_vars": env_vars}, log_to_driver=True)
