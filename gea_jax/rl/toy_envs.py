"""A tiny pure-JAX task with Brax's functional env interface, for fast PPO tests (compiles in a second).

``PointMass``: a point in the plane must reach a random goal. Observation ``[pos, goal - pos]`` (4 floats);
actions are either continuous velocities in ``[-1, 1]^2`` or 5 discrete moves (stay, +x, -x, +y, -y).
Reward ``-|goal - pos|`` per step, plus 10 and termination when within ``goal_radius``. It plugs into
``BraxVecEnv`` exactly like a Brax env (``reset(key) -> state``, ``step(state, action) -> state`` with
``obs``/``reward``/``done`` fields), so tests exercise the same wrapper and learner as the Brax bodies.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

_MOVES = jnp.array([[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], jnp.float32)


@struct.dataclass
class PointMassState:
  pos: jax.Array
  goal: jax.Array
  obs: jax.Array
  reward: jax.Array
  done: jax.Array


class PointMass:
  def __init__(self, discrete: bool = False, speed: float = 0.1, goal_radius: float = 0.1):
    self.discrete = discrete
    self.speed = speed
    self.goal_radius = goal_radius
    self.observation_size = 4
    self.action_size = 5 if discrete else 2

  def _obs(self, pos, goal):
    return jnp.concatenate([pos, goal - pos], axis=-1)

  def reset(self, key: jax.Array) -> PointMassState:
    kp, kg = jax.random.split(key)
    pos = jax.random.uniform(kp, (2,), minval=-1.0, maxval=1.0)
    goal = jax.random.uniform(kg, (2,), minval=-1.0, maxval=1.0)
    zero = jnp.zeros(())
    return PointMassState(pos=pos, goal=goal, obs=self._obs(pos, goal), reward=zero, done=zero)

  def step(self, state: PointMassState, action: jax.Array) -> PointMassState:
    vel = _MOVES[action] if self.discrete else jnp.clip(action, -1.0, 1.0)
    pos = jnp.clip(state.pos + self.speed * vel, -1.5, 1.5)
    dist = jnp.linalg.norm(state.goal - pos)
    reached = dist < self.goal_radius
    reward = -dist + 10.0 * reached
    return state.replace(pos=pos, obs=self._obs(pos, state.goal), reward=reward, done=reached.astype(jnp.float32))
