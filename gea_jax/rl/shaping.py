"""Potential-based reward shaping (Ng, Harada & Russell, 1999) as an environment wrapper.

    env = PotentialShaping(registry.make("grid_goto_ego"), coef=0.1, discount=0.97)

Each step's reward becomes ``r + coef * (discount * phi(s') - phi(s))``, with ``phi(s') = 0`` when the step ends the
episode by success (``terminal``): a term that telescopes along every trajectory, so it changes no policy's ranking
(the optimal policies for ``discount`` are the same as without it) but gives a sparse-reward body a learning signal on
every step. ``phi`` is the body's ``shaping_potential(state)`` (the grid bodies: minus the distance, in actions, to the
target; `gea_jax.envs.grid.GridTask.shaping_potential`). Only PPO's collector sees the shaped reward
(``ppo.shaping``); success and evaluation read the unwrapped body.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gea_jax.envs.base import EnvState


def has_potential(env) -> bool:
  """Whether ``env`` defines a shaping potential for its task (traced abstractly on a reset state; a body without
  one lacks the method or raises NotImplementedError)."""
  potential = getattr(env, "shaping_potential", None)
  if not callable(potential):
    return False
  try:
    jax.eval_shape(lambda key: potential(env.reset(key)), jax.random.key(0))
  except NotImplementedError:
    return False
  return True


class PotentialShaping:
  """``env`` with ``coef * (discount * phi(s') - phi(s))`` added to every step's reward; all else is ``env``'s."""

  def __init__(self, env, coef: float, discount: float):
    if not has_potential(env):
      raise ValueError(f"{env.spec.name}: has no shaping_potential(state), so its reward cannot be shaped")
    if not 0.0 <= discount <= 1.0:
      raise ValueError(f"PotentialShaping: discount must be in [0, 1], got {discount}")
    self.env, self.coef, self.discount = env, float(coef), float(discount)

  def __getattr__(self, name):  # spec, reset, instruction, render, ... of the wrapped body
    if name == "env":  # not set yet (e.g. while copying): no recursion
      raise AttributeError(name)
    return getattr(self.env, name)

  def step(self, state: EnvState, action) -> EnvState:
    phi = self.env.shaping_potential(state)
    nxt = self.env.step(state, action)
    phi_next = jnp.where(nxt.terminal, 0.0, self.env.shaping_potential(nxt))
    return nxt.replace(reward=nxt.reward + self.coef * (self.discount * phi_next - phi))
