"""PPO objective: clipped surrogate, (optionally clipped) value loss, entropy bonus.

Each term is a plain function of arrays so the MLP experts and the VLM agent (whose log-probability is a sum
over action tokens) share them; ``ppo_loss`` combines them given new/old log-probs, values and advantages.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize_advantages(adv: jax.Array, eps: float = 1e-8) -> jax.Array:
  return (adv - adv.mean()) / (adv.std() + eps)


def clipped_surrogate_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array,
                           clip_eps: float) -> tuple[jax.Array, dict]:
  """``-mean(min(r A, clip(r, 1 - eps, 1 + eps) A))`` with ``r = exp(log_prob - old_log_prob)``."""
  ratio = jnp.exp(log_prob - old_log_prob)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
  loss = -jnp.mean(jnp.minimum(unclipped, clipped))
  stats = {
      "clip_fraction": jnp.mean((jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32)),
      "approx_kl": jnp.mean((ratio - 1.0) - (log_prob - old_log_prob)),
  }
  return loss, stats


def value_loss(values: jax.Array, old_values: jax.Array, targets: jax.Array,
               clip_eps: float | None) -> jax.Array:
  """``0.5 mean((V - target)^2)``; with ``clip_eps`` the PPO2 pessimistic max with the clipped prediction."""
  loss = jnp.square(values - targets)
  if clip_eps is not None:
    v_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
    loss = jnp.maximum(loss, jnp.square(v_clipped - targets))
  return 0.5 * jnp.mean(loss)


def ppo_loss(log_prob: jax.Array, old_log_prob: jax.Array, advantages: jax.Array, values: jax.Array,
             old_values: jax.Array, targets: jax.Array, entropy: jax.Array, *, clip_eps: float,
             value_clip_eps: float | None, vf_coef: float, entropy_coef: float,
             normalize_advantage: bool) -> tuple[jax.Array, dict]:
  """Total loss ``policy + vf_coef * value - entropy_coef * entropy`` and its parts."""
  if normalize_advantage:
    advantages = normalize_advantages(advantages)
  pg, stats = clipped_surrogate_loss(log_prob, old_log_prob, advantages, clip_eps)
  vl = value_loss(values, old_values, targets, value_clip_eps)
  ent = jnp.mean(entropy)
  total = pg + vf_coef * vl - entropy_coef * ent
  return total, {"loss": total, "policy_loss": pg, "value_loss": vl, "entropy": ent, **stats}
