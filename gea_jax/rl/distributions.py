"""Action distributions for PPO: a categorical head and a tanh-squashed Gaussian head.

Both are pytrees (usable inside jit/scan) with one interface, so the PPO core never branches on the head:

- ``sample(key) -> raw``: what the rollout stores (a class index, or the *pre-tanh* Gaussian sample);
- ``log_prob(raw)``: log-density of ``raw`` under the distribution of the *env action*
  (for the tanh head this includes the change of variables ``-sum log(1 - tanh(u)^2)``);
- ``entropy(key)``: entropy (for the tanh head a one-sample estimate of the squashed entropy, as in Brax);
- ``to_action(raw)``: the env action (identity for categorical, ``tanh`` for the Gaussian);
- ``mode()``: the deterministic env action.

Keeping the pre-tanh sample avoids ``arctanh`` of a saturated action, which is numerically useless.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def tanh_log_det_jacobian(u: jax.Array) -> jax.Array:
  """``log(d tanh(u) / du) = log(1 - tanh(u)^2)``, in the stable form ``2 (log 2 - u - softplus(-2u))``."""
  return 2.0 * (math.log(2.0) - u - jax.nn.softplus(-2.0 * u))


@struct.dataclass
class TanhNormal:
  """Diagonal Gaussian over pre-tanh actions ``u``; the env action is ``tanh(u)`` in (-1, 1)."""

  loc: jax.Array
  scale: jax.Array

  @classmethod
  def from_params(cls, params: jax.Array, min_std: float = 1e-3) -> "TanhNormal":
    """``params[..., :A]`` is the mean, ``params[..., A:]`` goes through softplus (+ ``min_std``) to the std."""
    loc, raw_scale = jnp.split(params, 2, axis=-1)
    return cls(loc=loc, scale=jax.nn.softplus(raw_scale) + min_std)

  def sample(self, key: jax.Array) -> jax.Array:
    return self.loc + self.scale * jax.random.normal(key, self.loc.shape, self.loc.dtype)

  def log_prob(self, raw: jax.Array) -> jax.Array:
    z = (raw - self.loc) / self.scale
    gauss = -0.5 * jnp.square(z) - jnp.log(self.scale) - _LOG_SQRT_2PI
    return jnp.sum(gauss - tanh_log_det_jacobian(raw), axis=-1)

  def entropy(self, key: jax.Array) -> jax.Array:
    gauss = 0.5 + _LOG_SQRT_2PI + jnp.log(self.scale)
    return jnp.sum(gauss + tanh_log_det_jacobian(self.sample(key)), axis=-1)

  def to_action(self, raw: jax.Array) -> jax.Array:
    return jnp.tanh(raw)

  def mode(self) -> jax.Array:
    return jnp.tanh(self.loc)


@struct.dataclass
class Categorical:
  """Categorical over the last axis of ``logits``; actions are int32 class indices."""

  logits: jax.Array

  @classmethod
  def from_params(cls, params: jax.Array) -> "Categorical":
    return cls(logits=jax.nn.log_softmax(params, axis=-1))

  def sample(self, key: jax.Array) -> jax.Array:
    return jax.random.categorical(key, self.logits, axis=-1).astype(jnp.int32)

  def log_prob(self, raw: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(self.logits, axis=-1)
    return jnp.take_along_axis(logp, raw[..., None].astype(jnp.int32), axis=-1)[..., 0]

  def entropy(self, key: jax.Array | None = None) -> jax.Array:
    del key
    logp = jax.nn.log_softmax(self.logits, axis=-1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)

  def to_action(self, raw: jax.Array) -> jax.Array:
    return raw

  def mode(self) -> jax.Array:
    return jnp.argmax(self.logits, axis=-1).astype(jnp.int32)
