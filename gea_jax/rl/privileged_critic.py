"""An asymmetric (privileged) critic for the VLM agent's PPO: a value MLP on the simulator's state, not on pixels.

The agent's own value head reads the LLM's last hidden state, i.e. only what the policy perceives; on the grid it
explains none of the return's variance (docs/benchmarks.md, sessions 15-16), so every GAE advantage carries the
returns' whole spread. The value function is only a baseline for training, so it may read what the policy cannot
(asymmetric actor-critic, Pinto et al. 2018): ``ppo.critic = "privileged"`` trains this MLP on each body's
`privileged_features` and uses its values for GAE; the policy, and what is evaluated and exported, is unchanged.

`privileged_features(env)` -> ``fn(state) -> float32 [D]``, pure and vmappable: the body's state vector, its task
parameters (target positions, object ids, ...), the fraction of the time limit used and, for bodies with a shaping
potential (`gea_jax.rl.shaping.has_potential`: the go-to / pick-up grid bodies), the number of actions left to
the target. Every feature goes through symlog (sign(x) log(1 + |x|)), so ids and distances of any range stay O(1).

`PrivilegedCritic`: one MLP for all bodies; its input is a body's features zero-padded to the widest body's and a
one-hot of the body's index (`critic_inputs`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gea_jax.envs.base import EnvState
from gea_jax.rl.networks import MLP
from gea_jax.rl.shaping import has_potential


def symlog(x: jax.Array) -> jax.Array:
  return jnp.sign(x) * jnp.log1p(jnp.abs(x))


def privileged_features(env) -> Callable[[EnvState], jax.Array]:
  """``fn(state) -> float32 [D]`` for one unbatched state of ``env`` (see the module docstring)."""
  max_steps = float(env.spec.max_episode_steps)
  potential = env.shaping_potential if has_potential(env) else None

  def fn(state: EnvState) -> jax.Array:
    parts = [jnp.ravel(state.obs["state"]).astype(jnp.float32)]
    parts += [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(state.task)]
    parts.append((state.step.astype(jnp.float32) / max_steps)[None])
    if potential is not None:
      parts.append(-potential(state).astype(jnp.float32)[None])
    return symlog(jnp.concatenate(parts))
  return fn


def feature_dim(env) -> int:
  """D of `privileged_features(env)` (traced abstractly on a reset state)."""
  fn = privileged_features(env)
  return int(jax.eval_shape(lambda key: fn(env.reset(key)), jax.random.key(0)).shape[0])


def critic_inputs(features: jax.Array, body: int, num_bodies: int, width: int) -> jax.Array:
  """``features [..., D]`` of body ``body`` -> ``[..., width + num_bodies]``: zero-padded, then the body's one-hot."""
  d = features.shape[-1]
  if d > width:
    raise ValueError(f"critic_inputs: {d} features do not fit the critic's width {width}")
  pad = jnp.zeros(features.shape[:-1] + (width - d,), jnp.float32)
  one_hot = jnp.broadcast_to(jax.nn.one_hot(body, num_bodies, dtype=jnp.float32), features.shape[:-1] + (num_bodies,))
  return jnp.concatenate([features.astype(jnp.float32), pad, one_hot], -1)


class PrivilegedCritic(nnx.Module):
  """``critic(x [..., in_dim]) -> value [...]``: an MLP (swish) whose last layer starts near zero."""

  def __init__(self, in_dim: int, hidden: Sequence[int], *, rngs: nnx.Rngs):
    self.mlp = MLP(in_dim, tuple(hidden), 1, "swish", rngs=rngs, last_init_scale=0.01)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.mlp(x)[..., 0]
