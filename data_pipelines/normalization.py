"""Normalization statistics of actions and states, computed from a dataset at build time.

Each embodiment's dataset carries `normalization.json` beside its array_record files with, for the
action and the state vectors of the train split: mean, std, min, max and the 1st/99th percentiles
(q01/q99), per dimension, plus the number of steps they were computed from. Discrete actions get no
action statistics (`"action": null`). The pipeline loads these to put every embodiment's vectors on a
common scale; a checkpoint copies the same JSON so a deployed policy can undo the scaling.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import numpy as np

NORMALIZATION_FILE = "normalization.json"
_EPS = 1e-6
Mode = Literal["mean_std", "quantile", "none"]


@dataclasses.dataclass(frozen=True)
class VectorStats:
  """Per-dimension statistics of one vector-valued field (action or state)."""

  mean: np.ndarray
  std: np.ndarray
  min: np.ndarray
  max: np.ndarray
  q01: np.ndarray
  q99: np.ndarray
  count: int

  @property
  def dim(self) -> int:
    return int(self.mean.shape[0])

  @classmethod
  def compute(cls, x: np.ndarray) -> "VectorStats":
    """Statistics of `x` [N, D] along axis 0 (float64 accumulation, stored as float32)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
      raise ValueError(f"VectorStats.compute expects a [N, D] array, got shape {x.shape}")
    if x.shape[0] == 0:
      raise ValueError("VectorStats.compute needs at least one row")
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    return cls(mean=f32(x.mean(0)), std=f32(x.std(0)), min=f32(x.min(0)), max=f32(x.max(0)),
               q01=f32(np.quantile(x, 0.01, axis=0)), q99=f32(np.quantile(x, 0.99, axis=0)),
               count=int(x.shape[0]))

  def normalize(self, x: np.ndarray, mode: Mode) -> np.ndarray:
    """Maps raw values to the normalized scale (the last axis is the vector dimension)."""
    x = np.asarray(x, dtype=np.float32)
    if mode == "mean_std":
      return (x - self.mean) / np.maximum(self.std, _EPS)
    if mode == "quantile":  # q01 -> -1, q99 -> +1, clipped to [-1, 1]
      scale = np.maximum(self.q99 - self.q01, _EPS)
      return np.clip(2.0 * (x - self.q01) / scale - 1.0, -1.0, 1.0)
    if mode == "none":
      return x
    raise ValueError(f"normalization mode must be 'mean_std', 'quantile' or 'none', got {mode!r}")

  def denormalize(self, y: np.ndarray, mode: Mode) -> np.ndarray:
    """Inverse of `normalize` (exact for mean_std; for quantile, exact inside [q01, q99])."""
    y = np.asarray(y, dtype=np.float32)
    if mode == "mean_std":
      return y * np.maximum(self.std, _EPS) + self.mean
    if mode == "quantile":
      return (y + 1.0) / 2.0 * np.maximum(self.q99 - self.q01, _EPS) + self.q01
    if mode == "none":
      return y
    raise ValueError(f"normalization mode must be 'mean_std', 'quantile' or 'none', got {mode!r}")

  def to_json(self) -> dict[str, Any]:
    d: dict[str, Any] = {k: np.asarray(getattr(self, k)).astype(float).tolist()
                         for k in ("mean", "std", "min", "max", "q01", "q99")}
    d["count"] = self.count
    return d

  @classmethod
  def from_json(cls, d: dict[str, Any], where: str = "normalization") -> "VectorStats":
    missing = [k for k in ("mean", "std", "min", "max", "q01", "q99", "count") if k not in d]
    if missing:
      raise ValueError(f"{where}: missing keys {missing}")
    arrays = {k: np.asarray(d[k], dtype=np.float32).reshape(-1) for k in ("mean", "std", "min", "max", "q01", "q99")}
    dims = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(dims.values())) != 1:
      raise ValueError(f"{where}: statistics have different lengths {dims}")
    return cls(count=int(d["count"]), **arrays)


@dataclasses.dataclass(frozen=True)
class NormalizationStats:
  """Statistics of one embodiment's dataset: `action` is None for discrete action spaces."""

  embodiment: str
  action: VectorStats | None
  state: VectorStats | None

  @classmethod
  def compute(cls, embodiment: str, actions: np.ndarray | None, states: np.ndarray | None) -> "NormalizationStats":
    """`actions` [N, da] (None for discrete), `states` [N, ds] (None or width 0 when there is no state)."""
    action = VectorStats.compute(actions) if actions is not None else None
    state = VectorStats.compute(states) if states is not None and np.shape(states)[-1] > 0 else None
    return cls(embodiment=embodiment, action=action, state=state)

  def to_json(self) -> dict[str, Any]:
    return {"embodiment": self.embodiment,
            "action": None if self.action is None else self.action.to_json(),
            "state": None if self.state is None else self.state.to_json()}

  @classmethod
  def from_json(cls, d: dict[str, Any], where: str = "normalization") -> "NormalizationStats":
    for k in ("embodiment", "action", "state"):
      if k not in d:
        raise ValueError(f"{where}: missing key {k!r}")
    return cls(embodiment=str(d["embodiment"]),
               action=None if d["action"] is None else VectorStats.from_json(d["action"], f"{where}: action"),
               state=None if d["state"] is None else VectorStats.from_json(d["state"], f"{where}: state"))

  def save(self, path) -> None:
    with open(path, "w") as f:
      json.dump(self.to_json(), f, indent=1)

  @classmethod
  def load(cls, path) -> "NormalizationStats":
    try:
      with open(path) as f:
        d = json.load(f)
    except FileNotFoundError:
      raise FileNotFoundError(f"normalization statistics not found: {path}") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not valid JSON ({e})") from None
    return cls.from_json(d, where=str(path))


class StatsAccumulator:
  """Collects action/state rows episode by episode while a dataset is written (images are not kept)."""

  def __init__(self, embodiment: str, continuous_action: bool):
    self.embodiment = embodiment
    self.continuous_action = continuous_action
    self._actions: list[np.ndarray] = []
    self._states: list[np.ndarray] = []

  def add(self, action: np.ndarray, state: np.ndarray) -> None:
    if self.continuous_action:
      self._actions.append(np.asarray(action, np.float32))
    self._states.append(np.asarray(state, np.float32))

  def result(self) -> NormalizationStats:
    if not self._states:
      raise ValueError(f"no episodes to compute normalization statistics of {self.embodiment!r} from")
    actions = np.concatenate(self._actions) if self.continuous_action else None
    return NormalizationStats.compute(self.embodiment, actions, np.concatenate(self._states))
