"""What an embodiment is: its action space and observation spec, shared by envs, tokenizers and data.

Every other part of the stack (the RVQ action tokenizer, the dataset schema, the prompt layout,
the policy's valid-token mask) reads an embodiment only through these small frozen dataclasses,
so they can be saved as JSON beside a checkpoint and restored with nothing else.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

import numpy as np


@dataclasses.dataclass(frozen=True)
class ActionSpace:
  """A continuous box (dim, low, high) or a discrete set of named actions."""

  kind: Literal["continuous", "discrete"]
  dim: int = 0  # continuous: action dimension; discrete: 1 (one index per step)
  low: tuple[float, ...] = ()
  high: tuple[float, ...] = ()
  names: tuple[str, ...] = ()  # discrete: one name per action index

  def __post_init__(self):
    if self.kind == "continuous":
      if self.dim <= 0 or len(self.low) != self.dim or len(self.high) != self.dim:
        raise ValueError(
            f"continuous ActionSpace needs dim > 0 and low/high of length dim; got dim={self.dim}, "
            f"len(low)={len(self.low)}, len(high)={len(self.high)}")
      if any(lo >= hi for lo, hi in zip(self.low, self.high)):
        raise ValueError(f"ActionSpace low must be < high elementwise; got {self.low} / {self.high}")
    elif self.kind == "discrete":
      if not self.names:
        raise ValueError("discrete ActionSpace needs at least one named action")
    else:
      raise ValueError(f"ActionSpace.kind must be 'continuous' or 'discrete', got {self.kind!r}")

  @property
  def num_actions(self) -> int:
    return len(self.names)

  @property
  def is_continuous(self) -> bool:
    return self.kind == "continuous"

  def clip(self, action: np.ndarray) -> np.ndarray:
    return np.clip(action, np.asarray(self.low), np.asarray(self.high))


@dataclasses.dataclass(frozen=True)
class EmbodimentSpec:
  """Static description of one embodiment (body + task family)."""

  name: str
  action_space: ActionSpace
  image_shape: tuple[int, int, int] = (64, 64, 3)
  state_dim: int = 0
  max_episode_steps: int = 100
  description: str = ""  # one sentence used in the embodiment prompt ("a two-link planar arm ...")

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "EmbodimentSpec":
    d = dict(d)
    a = dict(d.pop("action_space"))
    for k in ("low", "high", "names"):
      a[k] = tuple(a.get(k, ()))
    d["image_shape"] = tuple(d["image_shape"])
    return cls(action_space=ActionSpace(**a), **d)

  def dumps(self) -> str:
    return json.dumps(self.to_json(), sort_keys=True)
