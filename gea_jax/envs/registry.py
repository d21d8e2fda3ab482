"""Name -> embodiment registry. Modules are imported lazily so `names()` costs nothing.

    from gea_jax.envs import registry
    env = registry.make("reacher")          # -> Embodiment
    registry.names()                        # -> ("grid_goto", ..., "reacher")
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

# name -> "module:factory" (lazy) or a callable factory registered at run time.
_REGISTRY: dict[str, str | Callable[..., Any]] = {
    "reacher": "gea_jax.envs.reacher:Reacher",
    "pusher": "gea_jax.envs.pusher:Pusher",
    "halfcheetah": "gea_jax.envs.halfcheetah:HalfCheetah",
    "grid_goto": "gea_jax.envs.grid:GridGoTo",
    "grid_pickup": "gea_jax.envs.grid:GridPickup",
    "grid_putnext": "gea_jax.envs.grid:GridPutNext",
    "grid_goto_ego": "gea_jax.envs.grid:GridGoToEgo",
    "grid_pickup_ego": "gea_jax.envs.grid:GridPickupEgo",
    "grid_putnext_ego": "gea_jax.envs.grid:GridPutNextEgo",
}


def names() -> tuple[str, ...]:
  """All registered embodiment names, sorted."""
  return tuple(sorted(_REGISTRY))


def register(name: str, factory: str | Callable[..., Any], *, overwrite: bool = False) -> None:
  """Registers a factory ("module:attr" or a callable returning an Embodiment) under `name`."""
  if name in _REGISTRY and not overwrite:
    raise ValueError(f"embodiment {name!r} is already registered (pass overwrite=True to replace it)")
  _REGISTRY[name] = factory


def _resolve(name: str) -> Callable[..., Any]:
  if name not in _REGISTRY:
    raise KeyError(f"unknown embodiment {name!r}; known embodiments: {', '.join(names())}")
  factory = _REGISTRY[name]
  if isinstance(factory, str):
    module, attr = factory.split(":")
    factory = getattr(importlib.import_module(module), attr)
  return factory


_CACHE: dict[tuple, Any] = {}


def make(name: str, **kwargs: Any):
  """Builds the embodiment `name` (cached per name and kwargs: embodiments are immutable)."""
  factory = _resolve(name)
  try:
    cache_key = (name, tuple(sorted(kwargs.items())))
    hash(cache_key)
  except TypeError:
    return factory(**kwargs)
  if cache_key not in _CACHE:
    _CACHE[cache_key] = factory(**kwargs)
  return _CACHE[cache_key]
