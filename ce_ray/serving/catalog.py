"""The models one app serves: their public names, where they load from, and the names requests may use.

One model (``serve.model``): its name is ``serve.model_name`` or ``serve.model`` as given, and a
request may also name it by its path. Several (``serve.models``, NAME: DIR): the names are the keys,
the first is the default for requests that name no model, and replicas load them on demand (Serve's
model multiplexing).
"""

from __future__ import annotations

from dataclasses import dataclass

from ce_ray.config import ServeConfig
from ce_ray.modeling import is_remote, resolve_model_dir

__all__ = ["Catalog", "catalog"]


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
        return self.aliases.get(requested)

    @property
    def names(self) -> list[str]:
        return list(self.locations)


def catalog(cfg: ServeConfig) -> Catalog:
    """The :class:`Catalog` of ``cfg`` (``serve.model`` or ``serve.models``)."""
    if cfg.models:
        names = list(cfg.models)
        return Catalog(names[0], dict(cfg.models), {n: n for n in names}, multiplexed=True)
    assert cfg.model is not None
    name = cfg.model_name or cfg.model
    aliases = {name: name, cfg.model: name}
    if not is_remote(cfg.model):  # resolving a remote model would download it here
        try:
            aliases[resolve_model_dir(cfg.model)] = name
        except (FileNotFoundError, ValueError):
            pass
    return Catalog(name, {name: cfg.model}, aliases, multiplexed=False)
