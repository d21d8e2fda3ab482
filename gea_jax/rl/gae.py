"""Generalized advantage estimation over time-major ``[T, B]`` rollouts with auto-reset.

Conventions (same as Brax's PPO): ``termination[t] = 1`` when step ``t`` ended the episode in a terminal
state (no bootstrap); ``truncation[t] = 1`` when step ``t`` hit the time limit. Because the env auto-resets,
``values[t + 1]`` after a truncation belongs to the *next* episode, so truncated steps get a zero TD error and
their advantage chain is cut (they carry no learning signal, which is unbiased and simple).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compute_gae(rewards: jax.Array, values: jax.Array, bootstrap_value: jax.Array, termination: jax.Array,
                truncation: jax.Array, discount: float, gae_lambda: float) -> tuple[jax.Array, jax.Array]:
  """Returns ``(advantages, value_targets)``, both ``[T, B]``; ``bootstrap_value`` is ``V(s_T)``, ``[B]``.

  ``delta_t = (r_t + discount (1 - term_t) V_{t+1} - V_t) (1 - trunc_t)``,
  ``A_t = delta_t + discount lambda (1 - term_t)(1 - trunc_t) A_{t+1}``, targets ``A_t + V_t``.
  """
  if rewards.shape != values.shape or rewards.shape[1:] != bootstrap_value.shape:
    raise ValueError(f"compute_gae: rewards {rewards.shape}, values {values.shape} must be [T, B] and "
                     f"bootstrap_value {bootstrap_value.shape} must be [B]")
  not_term = 1.0 - termination.astype(values.dtype)
  not_trunc = 1.0 - truncation.astype(values.dtype)
  next_values = jnp.concatenate([values[1:], bootstrap_value[None]], axis=0)
  deltas = (rewards + discount * not_term * next_values - values) * not_trunc
  decay = discount * gae_lambda * not_term * not_trunc

  def step(acc, xs):
    delta, d = xs
    acc = delta + d * acc
    return acc, acc

  _, adv = jax.lax.scan(step, jnp.zeros_like(bootstrap_value), (deltas, decay), reverse=True)
  adv = jax.lax.stop_gradient(adv)
  return adv, jax.lax.stop_gradient(adv + values)
