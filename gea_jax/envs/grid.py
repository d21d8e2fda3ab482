"""Language-conditioned grid tasks (BabyAI-like) on xminigrid's JAX grid mechanics.

Three embodiments share one grid world (a walled room with a few coloured objects and coloured,
locked doors in its walls) and differ by task family:

  grid_goto      "go to the red ball" / "go to the blue door"
                                                      success: the object/door is in the cell in front
  grid_pickup    "pick up the blue key"               success: the agent holds the object
  grid_putnext   "put the green box next to the grey star"
                                                      success: it was just dropped next to the other

Why xminigrid (not navix): its core has exactly the mechanics these tasks need (pickable objects
of 6 kinds x 12 colours, a pocket, put-down onto a free cell) as small pure functions
(`xminigrid.core.actions.take_action`) that we can call from our own jittable reset/step, at about
1M steps/s; navix has no put-down/put-next mechanics. We use our own task sampling (xminigrid's
benchmark rulesets download at run time) and our own full-view RGB renderer (xminigrid's renderer
is host-side numpy).

Actions (discrete, xminigrid order): forward, right (turn clockwise), left, pickup, drop, toggle.
Doors (`num_doors` per room, distinct colours, never in a corner, the floor cell inside them kept free)
are locked landmarks: toggling them does nothing, so the agent never leaves the room. In grid_goto a
door is the target with probability `door_target_prob` (train and heldout_seed; heldout_combo targets
are always held-out objects).
Image: the whole room from above, one `image_size // grid_size` pixel square per cell; the agent
is a white triangle pointing where it faces, a held object shows as a coloured square on it.
State (19): agent row/col (scaled to [0,1]), facing one-hot (4), holding flag, held object kind
one-hot (6), held colour one-hot (6).
`target_point`: the centre of the cell holding the instruction's first object, in image fractions (recorded in the
expert datasets as the label of SFT's grounding loss, `gea_jax.agent.grounding`; never an input of the agent).

Egocentric variants (`grid_goto_ego`, `grid_pickup_ego`, `grid_putnext_ego`): the same tasks and dynamics, but the frame
is the top-down view turned by the agent's facing so that the agent always points up (a lossless 90-degree rotation;
the state vector still carries the absolute pose). What the agent faces is then always the cell above its triangle,
and "turn towards the target" reads off the frame without composing it with the facing; BabyAI's agents see their
rooms egocentrically for the same reason. `target_point` is given in the turned frame.

Held-out sets: "heldout_seed" (disjoint random stream) and "heldout_combo": the target object's
colour-kind pair is one of `HELDOUT_COMBOS`, which never appear (as target or distractor) in
"train" / "heldout_seed".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from xminigrid.core.actions import take_action
from xminigrid.core.constants import TILES_REGISTRY, Colors, Tiles
from xminigrid.core.grid import room
from xminigrid.types import AgentState

from gea_jax.envs.base import SPLITS, Embodiment, EnvState, check_split, finish_step, split_key
from gea_jax.envs.grid_paths import DIRECTIONS, distance_field
from gea_jax.envs.spec import ActionSpace, EmbodimentSpec

ACTION_NAMES = ("forward", "right", "left", "pickup", "drop", "toggle")
FORWARD, RIGHT, LEFT, PICKUP, DROP, TOGGLE = range(6)

OBJECTS = ("ball", "box", "pyramid", "key", "hexagon", "star")
OBJECT_TILES = (Tiles.BALL, Tiles.SQUARE, Tiles.PYRAMID, Tiles.KEY, Tiles.HEX, Tiles.STAR)
COLOURS = ("red", "green", "blue", "purple", "yellow", "grey")
COLOUR_IDS = (Colors.RED, Colors.GREEN, Colors.BLUE, Colors.PURPLE, Colors.YELLOW, Colors.GREY)
# One pair per colour and per kind: never seen in training.
HELDOUT_COMBOS = (("red", "ball"), ("green", "key"), ("blue", "box"), ("purple", "star"),
                  ("yellow", "pyramid"), ("grey", "hexagon"))

# (kind index, colour index) for every combination, and the held-out mask.
_COMBOS = np.array([(o, c) for o in range(len(OBJECTS)) for c in range(len(COLOURS))], np.int32)
_HELDOUT = np.array([(COLOURS[c], OBJECTS[o]) in HELDOUT_COMBOS for o, c in _COMBOS])
_TILE_OF_KIND = np.array(OBJECT_TILES, np.int32)
_COLOUR_OF = np.array(COLOUR_IDS, np.int32)

_RGB = {
    Colors.RED: (230, 40, 40), Colors.GREEN: (40, 200, 70), Colors.BLUE: (60, 100, 250),
    Colors.PURPLE: (170, 70, 230), Colors.YELLOW: (240, 220, 40), Colors.GREY: (160, 160, 160),
    Colors.BLACK: (20, 20, 20), Colors.WHITE: (250, 250, 250), Colors.ORANGE: (250, 140, 20),
    Colors.BROWN: (130, 80, 30), Colors.PINK: (250, 150, 200),
}


_DOOR_TILES = (Tiles.DOOR_LOCKED, Tiles.DOOR_CLOSED)


def _door_cell(c: int, rgb) -> np.ndarray:
  """A door in the wall: a coloured panel with a dark frame and a dark keyhole."""
  cell = np.empty((c, c, 3), np.uint8)
  cell[:] = np.asarray(rgb, np.uint8)
  cell[0, :] = cell[-1, :] = cell[:, 0] = cell[:, -1] = 50
  m = c // 2
  cell[m - max(1, c // 8):m + max(1, c // 8), m - max(1, c // 16):m + max(1, c // 16) + 1] = 20
  return cell


def _shape_mask(kind: int, c: int) -> np.ndarray:
  """Boolean [c, c] silhouette of an object kind (tile id) in a c-pixel cell."""
  yy, xx = np.meshgrid((np.arange(c) + 0.5) / c - 0.5, (np.arange(c) + 0.5) / c - 0.5, indexing="ij")
  r = np.hypot(xx, yy)
  ang = np.arctan2(yy, xx)
  if kind == Tiles.BALL:
    return r <= 0.36
  if kind == Tiles.SQUARE:
    return (np.abs(xx) <= 0.32) & (np.abs(yy) <= 0.32)
  if kind == Tiles.PYRAMID:
    return (yy <= 0.36) & (yy >= -0.38) & (np.abs(xx) <= (yy + 0.38) * 0.55)
  if kind == Tiles.KEY:
    head = np.hypot(xx + 0.18, yy) <= 0.2
    shaft = (np.abs(yy) <= 0.08) & (xx >= -0.1) & (xx <= 0.42)
    tooth = (xx >= 0.22) & (xx <= 0.32) & (yy >= 0) & (yy <= 0.25)
    return head | shaft | tooth
  if kind == Tiles.HEX:
    return r * np.cos((ang % (np.pi / 3)) - np.pi / 6) <= 0.34
  if kind == Tiles.STAR:
    spikes = 0.2 + 0.22 * np.abs(np.cos(2.5 * (ang + np.pi / 2)))
    return r <= spikes
  raise ValueError(f"no silhouette for tile id {kind}")


def _tile_table(c: int) -> np.ndarray:
  """uint8 [NUM_TILES, NUM_COLORS, c, c, 3] image of every (tile, colour) cell."""
  table = np.zeros((TILES_REGISTRY.shape[0], TILES_REGISTRY.shape[1], c, c, 3), np.uint8)
  floor = np.full((c, c, 3), 22, np.uint8)
  floor[0, :] = floor[:, 0] = 45  # faint grid lines
  table[:, :] = floor
  wall = np.full((c, c, 3), 105, np.uint8)
  wall[-1, :] = wall[:, -1] = 70
  table[Tiles.WALL, :] = wall
  for kind in OBJECT_TILES:
    mask = _shape_mask(kind, c)
    for col, rgb in _RGB.items():
      table[kind, col] = np.where(mask[..., None], np.asarray(rgb, np.uint8), floor)
  for door in _DOOR_TILES:
    for col, rgb in _RGB.items():
      table[door, col] = _door_cell(c, rgb)
  return table


def _agent_masks(c: int) -> np.ndarray:
  """Boolean [4, c, c] triangles pointing up, right, down, left."""
  yy, xx = np.meshgrid((np.arange(c) + 0.5) / c - 0.5, (np.arange(c) + 0.5) / c - 0.5, indexing="ij")
  up = (yy >= -0.4) & (yy <= 0.38) & (np.abs(xx) <= (yy + 0.4) * 0.55)
  return np.stack([up, np.rot90(up, -1), np.rot90(up, 2), np.rot90(up, 1)])


class GridTask(Embodiment):
  """A walled `grid_size` x `grid_size` room with `num_objects` objects; subclasses fix the task family."""

  task_family: str = ""
  task_splits = SPLITS
  egocentric = False  # True: the frame is turned so that the agent points up (the `_ego` embodiments)

  def __init__(self, image_size: int = 64, grid_size: int = 8, num_objects: int = 4,
               max_episode_steps: int = 64, num_doors: int = 2, door_target_prob: float = 1 / 3):
    if grid_size < 4:
      raise ValueError(f"{self.task_family}: grid_size must be >= 4, got {grid_size}")
    if image_size % grid_size:
      raise ValueError(f"{self.task_family}: image_size ({image_size}) must be a multiple of grid_size ({grid_size})")
    if not 0 <= num_doors <= len(COLOURS):
      raise ValueError(f"{self.task_family}: num_doors must be in [0, {len(COLOURS)}], got {num_doors}")
    if not 0.0 <= door_target_prob <= 1.0 or (door_target_prob > 0 and num_doors == 0):
      raise ValueError(f"{self.task_family}: door_target_prob must be in [0, 1] (0 without doors), got "
                       f"{door_target_prob} with {num_doors} doors")
    interior = (grid_size - 2) ** 2 - num_doors
    if not 2 <= num_objects <= min(interior - 1, int((~_HELDOUT).sum())):
      raise ValueError(f"{self.task_family}: num_objects must be in [2, {min(interior - 1, 30)}], got {num_objects}")
    self.grid_size, self.num_objects, self.image_size = grid_size, num_objects, image_size
    self.num_doors, self.door_target_prob = int(num_doors), float(door_target_prob)
    self.cell = image_size // grid_size
    view = ("seen from above, the view turned so that the agent always faces up" if self.egocentric
            else "seen from above")
    self.spec = EmbodimentSpec(
        name=f"grid_{self.task_family}" + ("_ego" if self.egocentric else ""),
        action_space=ActionSpace("discrete", 1, names=ACTION_NAMES),
        image_shape=(image_size, image_size, 3), state_dim=19, max_episode_steps=max_episode_steps,
        description=f"an agent in a grid room {view}; it turns, moves forward, picks up and drops objects")
    self._tiles = _tile_table(self.cell)
    self._agent = _agent_masks(self.cell)
    cells = np.array([(r, c) for r in range(1, grid_size - 1) for c in range(1, grid_size - 1)], np.int32)
    self._interior = cells
    # Door slots: wall cells that are not corners, and the interior cell each one opens onto.
    g = grid_size - 1
    walls = [((0, c), (1, c)) for c in range(1, g)] + [((g, c), (g - 1, c)) for c in range(1, g)]
    walls += [((r, 0), (r, 1)) for r in range(1, g)] + [((r, g), (r, g - 1)) for r in range(1, g)]
    self._door_cells = np.array([w for w, _ in walls], np.int32)
    self._door_inside = np.array([[int((cells == np.array(i)).all(1).nonzero()[0][0])] for _, i in walls], np.int32)[:, 0]
    self._empty_grid = np.asarray(room(grid_size, grid_size))

  # ---- sampling -------------------------------------------------------------------------
  def _sample_combos(self, key, task_split):
    """Distinct (kind, colour) indices [num_objects, 2]; entry 0 (and 1 for put-next) are the targets."""
    n = self.num_objects
    train = jnp.asarray(~_HELDOUT, jnp.float32)
    if task_split != "heldout_combo":
      idx = jax.random.choice(key, len(_COMBOS), (n,), replace=False, p=train / train.sum())
    else:
      k1, k2 = jax.random.split(key)
      held = jnp.asarray(_HELDOUT, jnp.float32)
      first = jax.random.choice(k1, len(_COMBOS), (), p=held / held.sum())
      rest_p = jnp.ones(len(_COMBOS)).at[first].set(0.0)
      rest = jax.random.choice(k2, len(_COMBOS), (n - 1,), replace=False, p=rest_p / rest_p.sum())
      idx = jnp.concatenate([first[None], rest])
    return jnp.asarray(_COMBOS)[idx]

  def reset(self, key, task_split="train"):
    check_split(task_split, self.task_splits, self.spec.name)
    key = split_key(key, task_split)
    k_obj, k_pos, k_dir, k_door, k_door_col, k_tgt = jax.random.split(key, 6)
    combos = self._sample_combos(k_obj, task_split)
    tiles = jnp.stack([jnp.asarray(_TILE_OF_KIND)[combos[:, 0]], jnp.asarray(_COLOUR_OF)[combos[:, 1]]], -1)
    grid = jnp.asarray(self._empty_grid)
    free = jnp.ones(len(self._interior), jnp.float32)
    doors = jnp.zeros((max(self.num_doors, 1), 2), jnp.int32)
    if self.num_doors:
      slot = jax.random.choice(k_door, len(self._door_cells), (self.num_doors,), replace=False)
      colour = jax.random.choice(k_door_col, len(COLOURS), (self.num_doors,), replace=False)
      doors = jnp.stack([jnp.full((self.num_doors,), Tiles.DOOR_LOCKED, jnp.int32),
                         jnp.asarray(_COLOUR_OF)[colour]], -1)
      wall = jnp.asarray(self._door_cells)[slot]
      grid = grid.at[wall[:, 0], wall[:, 1]].set(doors.astype(jnp.uint8))
      free = free.at[jnp.asarray(self._door_inside)[slot]].set(0.0)  # a door is always reachable
    cells = jnp.asarray(self._interior)[
        jax.random.choice(k_pos, len(self._interior), (self.num_objects + 1,), replace=False, p=free / free.sum())]
    grid = grid.at[cells[:-1, 0], cells[:-1, 1]].set(tiles.astype(jnp.uint8))
    agent = AgentState(position=cells[-1], direction=jax.random.randint(k_dir, (), 0, 4),
                       pocket=jnp.asarray(TILES_REGISTRY[Tiles.EMPTY, Colors.EMPTY]))
    target = tiles[0].astype(jnp.int32)
    if self.task_family == "goto" and self.num_doors and task_split != "heldout_combo":
      target = jnp.where(jax.random.bernoulli(k_tgt, self.door_target_prob), doors[0], target)
    task = {"obj_a": target, "obj_b": tiles[1].astype(jnp.int32)}
    inner = {"grid": grid, "agent": agent}
    z = jnp.zeros((), jnp.float32)
    f = jnp.zeros((), bool)
    task_id = jnp.asarray(("goto", "pickup", "putnext").index(self.task_family), jnp.int32)
    return EnvState(obs=self._obs(grid, agent), reward=z, done=f, terminal=f, success=f,
                    step=jnp.zeros((), jnp.int32), task_id=task_id, task=task, inner=inner)

  # ---- dynamics -------------------------------------------------------------------------
  def step(self, state: EnvState, action) -> EnvState:
    action = jnp.clip(jnp.asarray(action, jnp.int32).reshape(()), 0, len(ACTION_NAMES) - 1)
    grid, agent = state.inner["grid"], state.inner["agent"]
    new_grid, new_agent, changed = take_action(grid, agent, action)
    front_door = jnp.isin(self.front_tile(state), jnp.asarray([Tiles.DOOR_LOCKED, Tiles.DOOR_CLOSED]))
    new_grid = jnp.where((action == TOGGLE) & front_door, grid, new_grid)  # doors stay locked
    success = self._success(state.task, new_grid, new_agent, action, changed, agent)
    t = (state.step + 1).astype(jnp.float32)
    reward = jnp.where(success, 1.0 - 0.9 * t / self.spec.max_episode_steps, 0.0)
    return finish_step(state, obs=self._obs(new_grid, new_agent), reward=reward, success=success,
                       inner={"grid": new_grid, "agent": new_agent}, max_steps=self.spec.max_episode_steps)

  def _success(self, task, grid, agent, action, changed, old_agent):
    raise NotImplementedError

  @staticmethod
  def _front(agent):
    return agent.position + jnp.asarray(DIRECTIONS)[agent.direction]

  def front_cell(self, state: EnvState) -> jax.Array:
    """int [2]: (tile id, colour id) (xminigrid's ``Tiles`` / ``Colors``) of the cell the agent faces, as the task's
    ``obj_a`` names an object (jittable; vmap it over a batch)."""
    front = self._front(state.inner["agent"])
    return state.inner["grid"][front[0], front[1]]

  def front_tile(self, state: EnvState) -> jax.Array:
    """int: the tile id (xminigrid's ``Tiles``) of the cell the agent faces (jittable; vmap it over a batch)."""
    return self.front_cell(state)[0]

  def target_point(self, state: EnvState) -> jax.Array:
    """Centre of the cell holding the instruction's first object (object or door; the first match in row-major
    order), as (row, col) fractions of the image; (-1, -1) when it is in no cell (held in the pocket)."""
    grid = state.inner["grid"]
    hit = jnp.all(grid == state.task["obj_a"].astype(grid.dtype), axis=-1).reshape(-1)
    cell = jnp.argmax(hit)
    point = (jnp.stack([cell // self.grid_size, cell % self.grid_size]).astype(jnp.float32) + 0.5) / self.grid_size
    if self.egocentric:
      point = _turn_point(point, state.inner["agent"].direction)
    return jnp.where(hit.any(), point, -1.0)

  def shaping_potential(self, state: EnvState) -> jax.Array:
    """Minus the number of forward / turn actions from the agent's pose to one facing the instruction's first
    object (`grid_paths.distance_field`, capped at 4 G^2 when it cannot be reached): the potential of PPO's
    potential-based reward shaping (`gea_jax.rl.shaping`). Defined for go-to and pick-up, whose tasks end on reaching
    (go-to) or taking (pick-up) that object; put-next's second phase (carry to a free cell next to another object)
    has no such potential here."""
    if self.task_family not in ("goto", "pickup"):
      raise NotImplementedError(f"{self.spec.name}: no shaping potential (defined for the go-to and pick-up grid "
                                "bodies)")
    agent = state.inner["agent"]
    dist = distance_field(state.inner["grid"], state.task["obj_a"])[agent.position[0], agent.position[1],
                                                                     agent.direction]
    return -jnp.minimum(dist, jnp.float32(4 * self.grid_size ** 2))

  # ---- observation ----------------------------------------------------------------------
  def _obs(self, grid, agent):
    image = self.render(grid, agent)
    if self.egocentric:
      image = _turn_image(image, agent.direction)
    return {"image": image, "state": self._state_vec(agent)}

  def _state_vec(self, agent):
    g = self.grid_size - 1
    holding = agent.pocket[0] != Tiles.EMPTY
    kind = jnp.argmax(jnp.asarray(_TILE_OF_KIND) == agent.pocket[0])
    colour = jnp.argmax(jnp.asarray(_COLOUR_OF) == agent.pocket[1])
    return jnp.concatenate([
        agent.position.astype(jnp.float32) / g, jax.nn.one_hot(agent.direction, 4),
        holding[None].astype(jnp.float32),
        jax.nn.one_hot(kind, len(OBJECTS)) * holding, jax.nn.one_hot(colour, len(COLOURS)) * holding])

  def render(self, grid, agent):
    """uint8 [image_size, image_size, 3] view of the whole grid."""
    c, g = self.cell, self.grid_size
    cells = jnp.asarray(self._tiles)[grid[..., 0].astype(jnp.int32), grid[..., 1].astype(jnp.int32)]  # [g,g,c,c,3]
    r, col = agent.position[0], agent.position[1]
    patch = cells[r, col]
    patch = jnp.where(jnp.asarray(self._agent)[agent.direction][..., None], jnp.uint8(250), patch)
    holding = agent.pocket[0] != Tiles.EMPTY
    pocket_rgb = jnp.asarray(np.array([_RGB.get(i, (0, 0, 0)) for i in range(TILES_REGISTRY.shape[1])],
                                      np.uint8))[agent.pocket[1]]
    lo, hi = c // 2 - max(1, c // 8), c // 2 + max(1, c // 8)
    inner = jnp.zeros((c, c), bool).at[lo:hi, lo:hi].set(True)
    patch = jnp.where((inner & holding)[..., None], pocket_rgb, patch)
    cells = cells.at[r, col].set(patch)
    return cells.transpose(0, 2, 1, 3, 4).reshape(g * c, g * c, 3)

  # ---- language -------------------------------------------------------------------------
  @staticmethod
  def object_words(tile) -> str:
    tile = np.asarray(tile)
    kind = "door" if int(tile[0]) in _DOOR_TILES else OBJECTS[OBJECT_TILES.index(int(tile[0]))]
    return f"{COLOURS[COLOUR_IDS.index(int(tile[1]))]} {kind}"


def _turn_image(image: jax.Array, direction: jax.Array) -> jax.Array:
  """Turns a square [S, S, C] frame counter-clockwise by `direction` quarter turns (xminigrid's directions count
  clockwise from up), so that an agent facing `direction` points up."""
  turns = [jnp.rot90(image, k) for k in range(4)]
  return jnp.select([direction == k for k in range(4)], turns, turns[0])


def _turn_point(point: jax.Array, direction: jax.Array) -> jax.Array:
  """Where the (row, col) image fraction `point` lands in `_turn_image(image, direction)`: one counter-clockwise
  quarter turn maps (r, c) to (1 - c, r)."""
  turns = [point]
  for _ in range(3):
    turns.append(jnp.stack([1.0 - turns[-1][1], turns[-1][0]]))
  return jnp.select([direction == k for k in range(4)], turns, turns[0])


class GridGoTo(GridTask):
  task_family = "goto"

  def _success(self, task, grid, agent, action, changed, old_agent):
    f = self._front(agent)
    return jnp.all(grid[f[0], f[1]] == task["obj_a"].astype(grid.dtype))

  def describe_task(self, task, task_id):
    return f"go to the {self.object_words(task['obj_a'])}"


class GridPickup(GridTask):
  task_family = "pickup"

  def _success(self, task, grid, agent, action, changed, old_agent):
    return (action == PICKUP) & jnp.all(agent.pocket == task["obj_a"].astype(agent.pocket.dtype))

  def describe_task(self, task, task_id):
    return f"pick up the {self.object_words(task['obj_a'])}"


class GridPutNext(GridTask):
  task_family = "putnext"

  def _success(self, task, grid, agent, action, changed, old_agent):
    a = task["obj_a"].astype(grid.dtype)
    b = task["obj_b"].astype(grid.dtype)
    was_held = jnp.all(old_agent.pocket == a.astype(old_agent.pocket.dtype))
    placed = was_held & jnp.all(grid[changed[0], changed[1]] == a) & (agent.pocket[0] == Tiles.EMPTY)
    nbrs = changed[None] + jnp.asarray(DIRECTIONS)
    nbrs = jnp.clip(nbrs, 0, self.grid_size - 1)
    near = jnp.any(jnp.all(grid[nbrs[:, 0], nbrs[:, 1]] == b, -1))
    return (action == DROP) & placed & near

  def describe_task(self, task, task_id):
    return f"put the {self.object_words(task['obj_a'])} next to the {self.object_words(task['obj_b'])}"


class GridGoToEgo(GridGoTo):
  egocentric = True


class GridPickupEgo(GridPickup):
  egocentric = True


class GridPutNextEgo(GridPutNext):
  egocentric = True
