"""Generic on-policy rollout with ``lax.scan``: any vectorized JAX env, any policy.

``env_step_fn(env_state, action) -> (env_state, info)`` where ``info`` is a pytree with at least ``reward``,
``termination`` and ``truncation`` (``[B]`` each) and ``env_state.obs`` is the current observation batch.
``policy_fn(obs, key) -> (raw_action, env_action, extras)``: ``raw_action`` is what the learner re-scores
(pre-tanh sample, class index, or action tokens), ``extras`` a pytree such as ``{"log_prob", "value"}``.
The MLP experts and the VLM agent plug their own ``policy_fn`` into the same loop.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
from flax import struct


@struct.dataclass
class Transition:
  """Time-major rollout data, leaves ``[T, B, ...]``."""

  obs: Any
  action: Any  # raw action (what log_prob is computed on)
  extras: Any  # policy outputs at acting time (log_prob, value, ...)
  info: Any  # env outputs (reward, termination, truncation, episode stats, ...)


def rollout(env_step_fn: Callable, policy_fn: Callable, env_state: Any, key: jax.Array, length: int,
            obs_fn: Callable[[Any], Any] = lambda s: s.obs) -> tuple[Any, Transition]:
  """Run ``length`` steps; returns the final env state and the ``Transition`` of every step."""

  def step(env_state, key):
    obs = obs_fn(env_state)
    raw, action, extras = policy_fn(obs, key)
    env_state, info = env_step_fn(env_state, action)
    return env_state, Transition(obs=obs, action=raw, extras=extras, info=info)

  return jax.lax.scan(step, env_state, jax.random.split(key, length))
