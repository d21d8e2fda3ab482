"""State-based MLP actor-critic (Flax NNX): separate policy and value MLPs, as in Brax's PPO networks.

``ActorCritic(obs)`` returns ``(distribution, value)``: the interface the PPO core expects of any policy
(the VLM agent's policy module implements the same call). Parameters carry logical axis names
("embed", "mlp"); for these small MLPs the default rules keep them effectively replicated on a data mesh.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gea_jax import sharding as _sharding  # noqa: F401  (sets eager sharding off: variables carry logical names)
from gea_jax.rl.distributions import Categorical, TanhNormal

ACTIVATIONS = {"swish": jax.nn.swish, "relu": jax.nn.relu, "tanh": jnp.tanh, "elu": jax.nn.elu}
ACTION_HEADS = ("tanh_normal", "categorical")


class MLP(nnx.Module):
  """``Linear -> act -> ... -> Linear`` (no activation on the output)."""

  def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int, activation: str, *, rngs: nnx.Rngs,
               last_init_scale: float = 1.0):
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation: expected one of {sorted(ACTIVATIONS)}, got {activation!r}")
    self.activation = activation
    dims = [in_dim, *hidden, out_dim]
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
      init = jax.nn.initializers.lecun_uniform()
      if i == len(dims) - 2 and last_init_scale != 1.0:
        init = jax.nn.initializers.variance_scaling(last_init_scale / 3.0, "fan_in", "uniform")
      layers.append(nnx.Linear(a, b, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                               bias_init=nnx.with_partitioning(jax.nn.initializers.zeros, ("mlp",)), rngs=rngs))
    self.layers = nnx.List(layers)

  def __call__(self, x: jax.Array) -> jax.Array:
    act = ACTIVATIONS[self.activation]
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = act(x)
    return x


class ActorCritic(nnx.Module):
  """Policy MLP -> action distribution; value MLP -> scalar value. Input: normalized state observations."""

  def __init__(self, obs_dim: int, action_dim: int, *, action_head: str = "tanh_normal",
               policy_hidden: Sequence[int] = (32, 32, 32, 32), value_hidden: Sequence[int] = (256,) * 5,
               activation: str = "swish", min_std: float = 1e-3, rngs: nnx.Rngs):
    if action_head not in ACTION_HEADS:
      raise ValueError(f"action_head: expected one of {ACTION_HEADS}, got {action_head!r}")
    self.action_head = action_head
    self.min_std = min_std
    out = 2 * action_dim if action_head == "tanh_normal" else action_dim
    self.policy = MLP(obs_dim, policy_hidden, out, activation, rngs=rngs)
    self.value = MLP(obs_dim, value_hidden, 1, activation, rngs=rngs)

  def distribution(self, obs: jax.Array):
    params = self.policy(obs)
    if self.action_head == "tanh_normal":
      return TanhNormal.from_params(params, self.min_std)
    return Categorical.from_params(params)

  def __call__(self, obs: jax.Array):
    return self.distribution(obs), self.value(obs)[..., 0]
