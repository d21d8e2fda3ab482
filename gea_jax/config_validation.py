"""Config validation: every check names the key it rejects, in one line, before anything compiles.

Each trainer module exposes ``validate(config)``; the helpers here keep those checks short. A
failed check raises ``ConfigError("model.llm.num_heads: must divide model.llm.hidden_size=...")``.
"""

from __future__ import annotations

from typing import Any, Iterable

import ml_collections


class ConfigError(ValueError):
  """A config value is missing, of the wrong type or impossible. The message starts with the key."""


def get(config: ml_collections.ConfigDict, key: str) -> Any:
  """Value at a dotted key, or a ConfigError naming the missing key."""
  node: Any = config
  for part in key.split("."):
    try:
      node = node[part]
    except (KeyError, AttributeError, TypeError):
      raise ConfigError(f"{key}: missing from the config") from None
  return node


def require(ok: bool, key: str, expected: str, value: Any = None) -> None:
  if not ok:
    got = "" if value is None else f", got {value!r}"
    raise ConfigError(f"{key}: {expected}{got}")


def name_list(value) -> list[str]:
  """A config's list of names, written "a,b" (or as a list / tuple of names): the non-empty names, in order. Any
  other value reads as its string, so a wrong type reaches the caller's name check instead of a TypeError."""
  names = value if isinstance(value, (list, tuple)) else str(value or "").split(",")
  return [str(n).strip() for n in names if str(n).strip()]


def per_embodiment(config, key: str, convert, expected: str) -> dict[str, Any]:
  """``"name=value,name=value"`` (or a mapping) at ``key`` -> {embodiment: convert(value)}. Every name must be a
  registered embodiment; ``convert`` returns the value or raises ValueError / TypeError for a bad one (``expected``
  says what a good one is). Missing / empty: {}."""
  try:
    spec = get(config, key)
  except ConfigError:  # an optional key
    return {}
  if not spec:
    return {}
  if isinstance(spec, str):
    items = [x.strip().partition("=") for x in spec.split(",") if x.strip()]
    for name, sep, value in items:
      require(sep == "=" and bool(name.strip()), key, f"expected 'name={expected}' entries separated by commas",
              f"{name}{sep}{value}")
    items = [(name.strip(), value.strip()) for name, _, value in items]
  else:
    items = list(dict(spec).items())
  from gea_jax.envs import registry
  out = {}
  for name, value in items:
    require(name in registry.names(), key, f"unknown embodiment (known: {', '.join(registry.names())})", name)
    try:
      out[name] = convert(value)
    except (TypeError, ValueError):
      raise ConfigError(f"{key}: expected 'name={expected}' entries, got {name}={value!r}") from None
  return out


def check_type(config, key: str, types: type | tuple[type, ...]) -> Any:
  value = get(config, key)
  ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in _as_tuple(types))
  names = "/".join(t.__name__ for t in _as_tuple(types))
  require(ok, key, f"must be of type {names}", value)
  return value


def positive(config, key: str, allow_zero: bool = False) -> Any:
  value = check_type(config, key, (int, float))
  require(value >= 0 if allow_zero else value > 0, key, "must be >= 0" if allow_zero else "must be > 0", value)
  return value


def in_range(config, key: str, lo: float, hi: float) -> Any:
  value = check_type(config, key, (int, float))
  require(lo <= value <= hi, key, f"must be in [{lo}, {hi}]", value)
  return value


def one_of(config, key: str, choices: Iterable[Any]) -> Any:
  choices = tuple(choices)
  value = get(config, key)
  require(value in choices, key, f"must be one of {choices}", value)
  return value


def divides(config, small_key: str, big_key: str) -> None:
  small, big = get(config, small_key), get(config, big_key)
  require(small > 0 and big % small == 0, small_key, f"must divide {big_key}={big}", small)


def check_mesh(config, key: str = "mesh.shape") -> None:
  shape = tuple(get(config, key))
  require(len(shape) == 3, key, "must have 3 entries (data, fsdp, tensor)", shape)
  require(all(isinstance(s, int) and (s > 0 or s == -1) for s in shape), key,
          "entries must be positive ints or -1", shape)
  require(shape.count(-1) <= 1, key, "may contain at most one -1", shape)


def _as_tuple(t):
  return t if isinstance(t, tuple) else (t,)
