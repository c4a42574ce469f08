"""The models one app serves: their public names, where they load from, and the names requests may use.

One model (``serve.model``): its name is ``serve.model_name``, else :func:`default_name` (the model
directory's name, not its path), and a request may also name it by its path. Several (``serve.models``,
NAME: DIR): the names are the keys, the first is the default for requests that name no model, each
path is an alias of its model, and replicas load them on demand (Serve's model multiplexing).

Names are what clients see (answers, errors, ``/info``); paths are only accepted, never shown.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ce_ray.config import ServeConfig
from ce_ray.modeling import is_remote, resolve_model_dir

__all__ = ["Catalog", "catalog", "default_name"]


@dataclass(frozen=True)
class Catalog:
    default: str  # the model a request that names none gets
    locations: dict[str, str]  # name -> model directory or URI, in the config's order
    aliases: dict[str, str]  # every name a request may use -> the model's name
    multiplexed: bool  # several models, loaded on demand per replica

    def resolve(self, requested: str | None) -> str | None:
        """The name of the model a request asks for, or None for a name this app does not serve."""
        if requested is None:
            return self.default
        return self.aliases.get(requested) or self.aliases.get(requested.rstrip("/") or requested)  # "dir/" = "dir"

    @property
    def names(self) -> list[str]:
        return list(self.locations)


_CHOSEN = ("best", "final")  # the model dirs inside a train/tune output_dir


def _looks_local(model: str) -> bool:
    return os.path.isabs(model) or model.startswith((".", "~")) or os.path.exists(model)


def default_name(model: str) -> str:
    """The name ``model`` (``serve.model`` as given) is served under without ``serve.model_name``.

    The last part of the directory, URI or hub id (``runs/rerank`` → ``rerank``,
    ``cross-encoder/ms-marco-MiniLM-L6-v2`` → ``ms-marco-MiniLM-L6-v2``); a train/tune output's ``best/`` or
    ``final/`` is called by its output dir (``runs/rerank-tune/best`` → ``rerank-tune``). From the string
    alone (``.``, ``..`` and ``~`` aside), so that every replica, on any node, gives the same name.
    """
    location = model.split("://", 1)[1].split("?", 1)[0] if "://" in model else model
    if not location.strip("/") or location.rstrip("/").rsplit("/", 1)[-1] in (".", "..") or location.startswith("~"):
        location = os.path.abspath(os.path.expanduser(location or "."))
    parts = [p for p in location.split("/") if p]
    if len(parts) > 1 and parts[-1] in _CHOSEN:
        parts = parts[:-1]
    return parts[-1] if parts else model


def _paths(model: str) -> list[str]:
    """The spellings of ``model``'s location a request may use as its name: as given, absolute, resolved."""
    paths = [model]
    if not is_remote(model) and _looks_local(model):  # resolving a remote model would download it here
        paths.append(os.path.abspath(os.path.expanduser(model)))
        try:
            paths.append(resolve_model_dir(model))
        except (FileNotFoundError, ValueError):
            pass
    return paths


def catalog(cfg: ServeConfig) -> Catalog:
    """The :class:`Catalog` of ``cfg`` (``serve.model`` or ``serve.models``)."""
    if cfg.models:
        locations = dict(cfg.models)
    else:
        assert cfg.model is not None
        locations = {cfg.model_name or default_name(cfg.model): cfg.model}
    aliases = {name: name for name in locations}
    for name, location in locations.items():
        for path in _paths(location):
            aliases.setdefault(path, name)  # a model's name wins over another model's path; the first path wins
    return Catalog(next(iter(locations)), locations, aliases, multiplexed=bool(cfg.models))
