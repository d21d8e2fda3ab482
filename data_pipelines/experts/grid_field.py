"""Closed-loop, jittable shortest-path expert for grid_goto and grid_pickup (a distance field over poses).

The BFS planner (`grid_planner`) plans on the host and its plan is replayed open loop, which is right for clean
demonstrations but cannot correct itself when the executed action differs from the planned one (DART noise,
`rollout(..., action_noise=p)`). This expert recomputes, at every step and inside the jitted rollout, the number
of actions from every pose (row, col, facing) to a pose facing the target (value iteration over forward / right /
left until nothing changes), and acts greedily on it: forward if it brings the goal one action closer, else the
turn that does (ties: forward, right, left). At a goal pose it does what the planner does: forward for go-to (a
blocked forward keeps the goal), pickup for pick-up. Unsolvable poses (target walled in) act `left`, as the
planner does. Every action it takes is on a shortest path, so its episodes are as short as the planner's; tie
breaks among equally short paths may differ. grid_putnext (two phases, a drop cell to choose) has no field expert.

    expert = make_expert("grid_goto")          # Expert(jittable=True, name="distance_field")
    jax.vmap(expert.act)(states, keys)         # int32 [B]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from data_pipelines.experts.base import Expert
from gea_jax.envs.grid import FORWARD, LEFT, PICKUP, RIGHT
from gea_jax.envs.grid_paths import can_forward, distance_field, front_index

FAMILIES = ("goto", "pickup")
# Actions of the executed-action noise (rollout's `action_noise`): moves only. A random pickup would take the target
# (or another object) into the pocket and leave a go-to task unsolvable.
NOISE_ACTIONS = (FORWARD, RIGHT, LEFT)


def field_action(family: str, grid: jax.Array, position: jax.Array, direction: jax.Array, target: jax.Array):
  """int32 action of the field expert at one pose (see the module docstring)."""
  dist = distance_field(grid, target)
  fr, fc, _ = front_index(grid.shape[0])
  r, c, d = position[0], position[1], direction
  f_r, f_c = jnp.asarray(fr)[r, c, d], jnp.asarray(fc)[r, c, d]
  cost = jnp.stack([
      jnp.where(can_forward(grid)[r, c, d], dist[f_r, f_c, d], jnp.inf),
      dist[r, c, (d + 1) % 4],
      dist[r, c, (d - 1) % 4]])
  best = jnp.asarray((FORWARD, RIGHT, LEFT), jnp.int32)[jnp.argmin(cost)]  # argmin keeps the first of ties
  at_goal = dist[r, c, d] == 0
  goal_action = jnp.int32(FORWARD if family == "goto" else PICKUP)
  return jnp.where(at_goal, goal_action, jnp.where(jnp.isinf(dist[r, c, d]), jnp.int32(LEFT), best))


def make_expert(name: str) -> Expert:
  family = name.removeprefix("grid_").removesuffix("_ego")  # the _ego views share the task and its expert
  if family not in FAMILIES:
    raise KeyError(f"grid_field: no distance-field expert for {name!r} (it covers {', '.join('grid_' + f for f in FAMILIES)};"
                   " grid_putnext has only the host-side BFS planner, without action noise)")

  def act(state, key=None):
    del key
    agent = state.inner["agent"]
    return field_action(family, state.inner["grid"], agent.position, agent.direction, state.task["obj_a"])

  return Expert(embodiment=name, name="distance_field", act=act, jittable=True, noise_actions=NOISE_ACTIONS)
