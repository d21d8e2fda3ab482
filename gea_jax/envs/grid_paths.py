"""Shortest paths over grid poses (row, col, facing): the distance field to a pose facing a target tile.

Shared by the closed-loop grid expert (`data_pipelines.experts.grid_field`, which acts greedily on it) and the grid
bodies' shaping potential (`GridTask.shaping_potential`, used by PPO's potential-based reward shaping,
`gea_jax.rl.shaping`). Pure jax: jit- and vmap-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from xminigrid.core.constants import Tiles

DIRECTIONS = np.array([(-1, 0), (0, 1), (1, 0), (0, -1)])  # up, right, down, left (xminigrid)
WALKABLE = (Tiles.FLOOR, Tiles.GOAL, Tiles.DOOR_OPEN)  # as grid_planner: what a forward move may enter


def front_index(size: int):
  """Per pose (r, c, d): the front cell (clipped into the grid) and whether it is inside it."""
  r, c, d = np.meshgrid(np.arange(size), np.arange(size), np.arange(4), indexing="ij")
  fr, fc = r + DIRECTIONS[d][..., 0], c + DIRECTIONS[d][..., 1]
  inside = (fr >= 0) & (fr < size) & (fc >= 0) & (fc < size)
  return np.clip(fr, 0, size - 1), np.clip(fc, 0, size - 1), inside


def can_forward(grid: jax.Array) -> jax.Array:
  """bool [G, G, 4]: whether a forward move from pose (r, c, d) enters a walkable cell."""
  fr, fc, inside = front_index(grid.shape[0])
  return jnp.asarray(inside) & jnp.isin(grid[..., 0], jnp.asarray(WALKABLE, grid.dtype))[fr, fc]


def distance_field(grid: jax.Array, target: jax.Array) -> jax.Array:
  """float32 [G, G, 4]: fewest forward / right / left actions from each pose to one facing `target` (inf: never).

  grid: uint8 [G, G, 2] (tile, colour); target: [2] (tile, colour) of the object or door to face.
  """
  size = grid.shape[0]
  fr, fc, inside = front_index(size)
  forward_ok = can_forward(grid)
  goal = jnp.asarray(inside) & jnp.all(grid[fr, fc] == target.astype(grid.dtype), axis=-1)
  d_idx = np.broadcast_to(np.arange(4), (size, size, 4))
  inf = jnp.float32(jnp.inf)

  def relax(dist):
    turned = jnp.minimum(jnp.roll(dist, -1, axis=2), jnp.roll(dist, 1, axis=2))  # facing d+1 (right) / d-1 (left)
    moved = jnp.where(forward_ok, dist[fr, fc, d_idx], inf)
    return jnp.minimum(dist, 1.0 + jnp.minimum(turned, moved))

  def cond(carry):
    dist, previous, i = carry
    return jnp.any(dist != previous) & (i < 4 * size * size)

  def body(carry):
    dist, _, i = carry
    return relax(dist), dist, i + 1

  start = jnp.where(goal, 0.0, inf)
  dist, _, _ = jax.lax.while_loop(cond, body, (relax(start), start, jnp.int32(1)))
  return dist
