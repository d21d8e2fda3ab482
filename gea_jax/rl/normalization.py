"""Running observation normalization (parallel Welford / Chan et al. merge of batch moments).

The state is a small pytree saved with the policy, so an exported expert normalizes exactly as in training.
Under jit with envs sharded over the mesh, the batch moments are global reductions (XLA inserts the
all-reduce), so every device holds the same statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class RunningStats:
  count: jax.Array  # scalar float32 (number of observations seen)
  mean: jax.Array  # [obs_dim]
  m2: jax.Array  # [obs_dim], sum of squared deviations


def init_stats(obs_dim: int) -> RunningStats:
  return RunningStats(count=jnp.zeros((), jnp.float32), mean=jnp.zeros((obs_dim,), jnp.float32),
                      m2=jnp.zeros((obs_dim,), jnp.float32))


def update_stats(stats: RunningStats, batch: jax.Array) -> RunningStats:
  """Merge a batch ``[..., obs_dim]`` into the statistics."""
  x = batch.reshape(-1, batch.shape[-1]).astype(jnp.float32)
  n = jnp.asarray(x.shape[0], jnp.float32)
  b_mean = jnp.mean(x, axis=0)
  b_m2 = jnp.sum(jnp.square(x - b_mean), axis=0)
  total = stats.count + n
  delta = b_mean - stats.mean
  mean = stats.mean + delta * (n / total)
  m2 = stats.m2 + b_m2 + jnp.square(delta) * (stats.count * n / total)
  return RunningStats(count=total, mean=mean, m2=m2)


def std(stats: RunningStats, eps: float = 1e-6) -> jax.Array:
  var = stats.m2 / jnp.maximum(stats.count, 1.0)
  return jnp.sqrt(jnp.maximum(var, eps * eps))


def normalize(stats: RunningStats, obs: jax.Array, clip: float = 10.0) -> jax.Array:
  """``(obs - mean) / std`` clipped to ``[-clip, clip]``; the identity before any update (count 0)."""
  seen = stats.count > 0
  mean = jnp.where(seen, stats.mean, 0.0)
  scale = jnp.where(seen, std(stats), 1.0)
  return jnp.clip((obs - mean) / scale, -clip, clip)
