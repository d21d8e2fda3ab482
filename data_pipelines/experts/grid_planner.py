"""Shortest-path (BFS) planner for the grid tasks: optimal per phase, host-side numpy.

The state space is (row, col, facing); moves are forward (onto walkable cells), turn left,
turn right. Go-to: reach a pose facing the target. Pick-up: that, then pickup. Put-next: pick up
the first object, then reach a pose facing a free cell 4-adjacent to the second object, then drop.
A state holding a wrong object first drops it. Returns None when the task is unsolvable
(e.g. the agent is walled in by objects).
"""

from __future__ import annotations

import collections
from typing import Callable, Optional

import jax
import numpy as np
from xminigrid.core.constants import Tiles

from data_pipelines.experts.base import Expert
from gea_jax.envs.grid import DIRECTIONS, DROP, FORWARD, LEFT, PICKUP, RIGHT

_WALKABLE = (Tiles.FLOOR, Tiles.GOAL, Tiles.DOOR_OPEN)
_FREE = (Tiles.FLOOR, Tiles.GOAL)


def bfs(grid: np.ndarray, start: tuple[int, int, int],
        goal: Callable[[int, int, int], bool]) -> Optional[list[int]]:
  """Shortest action list from pose `start` to any pose with goal(r, c, d) (checked after moving)."""
  if goal(*start):
    return []
  h, w = grid.shape[:2]
  walk = np.isin(grid[..., 0], _WALKABLE)
  prev = {start: None}
  queue = collections.deque([start])
  while queue:
    s = queue.popleft()
    r, c, d = s
    nexts = [((r, c, (d + 1) % 4), RIGHT), ((r, c, (d - 1) % 4), LEFT)]
    fr, fc = r + DIRECTIONS[d][0], c + DIRECTIONS[d][1]
    if 0 <= fr < h and 0 <= fc < w and walk[fr, fc]:
      nexts.append(((fr, fc, d), FORWARD))
    for n, a in nexts:
      if n in prev:
        continue
      prev[n] = (s, a)
      if goal(*n):
        path = []
        while prev[n] is not None:
          n, a = prev[n]
          path.append(a)
        return path[::-1]
      queue.append(n)
  return None


def _front(r, c, d):
  return r + DIRECTIONS[d][0], c + DIRECTIONS[d][1]


def _find(grid, tile) -> Optional[tuple[int, int]]:
  hits = np.argwhere(np.all(grid == np.asarray(tile, grid.dtype), -1))
  return tuple(int(v) for v in hits[0]) if len(hits) else None


def plan(family: str, grid: np.ndarray, pos, direction: int, pocket, obj_a, obj_b) -> Optional[list[int]]:
  """Actions solving the task from this state, or None if it cannot be solved."""
  grid = np.array(grid)
  pose = (int(pos[0]), int(pos[1]), int(direction))
  obj_a, obj_b, pocket = np.asarray(obj_a), np.asarray(obj_b), np.asarray(pocket)
  actions: list[int] = []
  holding = int(pocket[0]) != Tiles.EMPTY
  holding_a = holding and np.array_equal(pocket, obj_a)

  def face(cell):
    return lambda r, c, d: _front(r, c, d) == cell

  def go(goal):
    nonlocal pose
    p = bfs(grid, pose, goal)
    if p is None:
      return False
    for a in p:
      r, c, d = pose
      if a == FORWARD:
        pose = (*_front(r, c, d), d)
      else:
        pose = (r, c, (d + (1 if a == RIGHT else -1)) % 4)
    actions.extend(p)
    return True

  free_front = lambda r, c, d: grid[_front(r, c, d)][0] in _FREE
  if holding and not (family == "putnext" and holding_a):
    if not go(free_front):  # put the wrong object down first
      return None
    grid[_front(*pose)] = pocket
    actions.append(DROP)
    holding = False
  if family in ("goto", "pickup") or not holding_a:
    target = _find(grid, obj_a)
    if target is None or not go(face(target)):
      return None
    if family == "goto":
      return actions or [FORWARD]  # facing the object: a blocked forward keeps the goal true
    actions.append(PICKUP)
    grid[target] = (Tiles.FLOOR, 7)  # xminigrid leaves black floor
    if family == "pickup":
      return actions
  target_b = _find(grid, obj_b)
  if target_b is None:
    return None
  near_b = {(target_b[0] + dr, target_b[1] + dc) for dr, dc in DIRECTIONS}
  if not go(lambda r, c, d: _front(r, c, d) in near_b and free_front(r, c, d)):
    return None
  actions.append(DROP)
  return actions


def plan_state(family: str, state) -> Optional[list[int]]:
  """`plan` for one unbatched EnvState of a grid embodiment."""
  s = jax.device_get(state)
  agent = s.inner["agent"]
  return plan(family, s.inner["grid"], agent.position, int(agent.direction), agent.pocket,
              s.task["obj_a"], s.task["obj_b"])


def make_expert(name: str) -> Expert:
  family = name.removeprefix("grid_").removesuffix("_ego")  # the _ego views share the task and its expert
  if family not in ("goto", "pickup", "putnext"):
    raise KeyError(f"grid_planner: no grid task family for embodiment {name!r}")

  def act(state, key=None):
    """First action of the current shortest plan (host side); `left` if the task is unsolvable."""
    p = plan_state(family, state)
    return np.int32(p[0] if p else LEFT)

  return Expert(embodiment=name, name="bfs_planner", act=act, jittable=False,
                plan=lambda state: plan_state(family, state))
