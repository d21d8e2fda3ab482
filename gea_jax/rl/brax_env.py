"""Vectorized Brax env for PPO: vmap, action repeat, time limit, auto-reset and episode statistics.

Works for any env with Brax's functional interface (``reset(key) -> state``, ``step(state, action) -> state``,
``state.obs/.reward/.done``, ``observation_size``, ``action_size``), e.g. ``gea_jax.rl.toy_envs.PointMass``.

Brax's own ``envs.training`` wrappers work on jax 0.10.2 but always auto-reset to the *same* initial state
per env; this wrapper keeps a cache of fresh random reset states (``refresh_resets``, called once per PPO
training call: one reset per env, cheap) and swaps it in where an episode ended. ``step`` reports, per env,
``reward``, ``termination`` (terminal state: no bootstrap), ``truncation`` (time limit), ``done``, and the
finished episode's ``episode_return``/``episode_length`` (valid where ``done``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

BRAX_BACKENDS = ("positional", "generalized", "spring", "mjx")


@struct.dataclass
class VecEnvState:
  inner: Any  # batched brax State after the last step (already reset where an episode ended)
  reset_cache: Any  # batched brax State: initial states used by the next auto-resets
  steps: jax.Array  # [B] int32, agent steps * action_repeat in the current episode
  ep_return: jax.Array  # [B] running undiscounted return of the current episode

  @property
  def obs(self) -> jax.Array:
    """``[B, obs_dim]`` current observations (brax's state vector for the env)."""
    return self.inner.obs


@struct.dataclass
class StepInfo:
  reward: jax.Array
  termination: jax.Array
  truncation: jax.Array
  done: jax.Array
  episode_return: jax.Array
  episode_length: jax.Array


def make_brax_env(name: str, backend: str = "positional", **kwargs):
  """``brax.envs.get_environment`` with a clear error for an unknown env or backend."""
  from brax import envs
  if backend not in BRAX_BACKENDS:
    raise ValueError(f"env.backend: expected one of {BRAX_BACKENDS}, got {backend!r}")
  if name not in envs._envs:  # pylint: disable=protected-access
    raise ValueError(f"env.name: unknown brax env {name!r}; expected one of {sorted(envs._envs)}")
  from gea_jax.envs.brax_body import mjx_models_on_this_process
  with mjx_models_on_this_process():  # multi-host: the System on this process's device, not process 0's
    return envs.get_environment(name, backend=backend, **kwargs)


def _select(mask: jax.Array, a: Any, b: Any) -> Any:
  """Per-env ``where(mask, a, b)`` over two batched pytrees."""
  def sel(x, y):
    return jnp.where(mask.reshape(mask.shape + (1,) * (x.ndim - 1)), x, y)
  return jax.tree.map(sel, a, b)


class BraxVecEnv:
  """``num_envs`` copies of a Brax env stepped in one vmapped call."""

  def __init__(self, env, num_envs: int, episode_length: int = 1000, action_repeat: int = 1):
    if num_envs < 1 or episode_length < 1 or action_repeat < 1:
      raise ValueError(f"num_envs ({num_envs}), episode_length ({episode_length}) and action_repeat "
                       f"({action_repeat}) must be >= 1")
    self.env = env
    self.num_envs = num_envs
    self.episode_length = episode_length
    self.action_repeat = action_repeat
    self.observation_size = int(env.observation_size)
    self.action_size = int(env.action_size)

  def reset_batch(self, key: jax.Array):
    """``num_envs`` fresh brax States (batched)."""
    return jax.vmap(self.env.reset)(jax.random.split(key, self.num_envs))

  def from_reset(self, inner, reset_cache) -> VecEnvState:
    zeros = jnp.zeros((self.num_envs,), jnp.float32)
    return VecEnvState(inner=inner, reset_cache=reset_cache, steps=jnp.zeros((self.num_envs,), jnp.int32),
                       ep_return=zeros)

  def reset(self, key: jax.Array) -> VecEnvState:
    k0, k1 = jax.random.split(key)
    return self.from_reset(self.reset_batch(k0), self.reset_batch(k1))

  def refresh_resets(self, state: VecEnvState, key: jax.Array) -> VecEnvState:
    return state.replace(reset_cache=self.reset_batch(key))

  def _step_one(self, s, a):
    def sub(carry, _):
      s, r, d = carry
      s = self.env.step(s, a)
      return (s, r + s.reward, jnp.maximum(d, s.done)), None
    (s, r, d), _ = jax.lax.scan(sub, (s, jnp.zeros(()), jnp.zeros(())), None, length=self.action_repeat)
    return s, r, d

  def step(self, state: VecEnvState, action: jax.Array) -> tuple[VecEnvState, StepInfo]:
    inner, reward, done_inner = jax.vmap(self._step_one)(state.inner, action)
    steps = state.steps + self.action_repeat
    termination = done_inner > 0
    truncation = (steps >= self.episode_length) & ~termination
    done = termination | truncation
    ep_return = state.ep_return + reward
    info = StepInfo(reward=reward, termination=termination.astype(jnp.float32),
                    truncation=truncation.astype(jnp.float32), done=done.astype(jnp.float32),
                    episode_return=ep_return, episode_length=steps.astype(jnp.float32))
    inner = _select(done, state.reset_cache, inner)
    new = VecEnvState(inner=inner, reset_cache=state.reset_cache, steps=jnp.where(done, 0, steps),
                      ep_return=jnp.where(done, 0.0, ep_return))
    return new, info
