"""Embodiment registry and environments: determinism, jit/vmap, specs, task splits, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gea_jax.envs import make, names, registry
from gea_jax.envs.grid import _COMBOS, _HELDOUT, COLOUR_IDS, HELDOUT_COMBOS, OBJECT_TILES
from gea_jax.envs.spec import EmbodimentSpec

ALL = ("grid_goto", "grid_pickup", "grid_putnext", "halfcheetah", "pusher", "reacher")


def test_names_and_unknown_name_error():
  assert set(ALL) <= set(names())
  with pytest.raises(KeyError, match="unknown embodiment 'walker'.*grid_goto.*reacher"):
    make("walker")
  with pytest.raises(ValueError, match="already registered"):
    registry.register("reacher", "gea_jax.envs.reacher:Reacher")


@pytest.mark.parametrize("name", ALL)
def test_spec_round_trip(name):
  spec = make(name).spec
  assert spec.name == name
  assert EmbodimentSpec.from_json(spec.to_json()) == spec
  assert spec.image_shape == (64, 64, 3)


def _reset_and_step(env, keys, actions):
  s0 = jax.vmap(env.reset)(keys)
  return s0, jax.vmap(env.step)(s0, actions)


@pytest.mark.parametrize("name", ["grid_putnext", "halfcheetah", "pusher"])
def test_reset_step_jit_vmap_deterministic(name):
  env = make(name)
  spec = env.spec
  fn = jax.jit(lambda k, a: _reset_and_step(env, k, a))
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  if spec.action_space.is_continuous:
    actions = jax.random.uniform(jax.random.PRNGKey(1), (3, spec.action_space.dim), minval=-1, maxval=1)
  else:
    actions = jnp.array([0, 1, 3], jnp.int32)
  s0, s1 = fn(keys, actions)
  s0b, s1b = fn(keys, actions)
  for a, b in zip(jax.tree_util.tree_leaves((s0.obs, s1.obs)), jax.tree_util.tree_leaves((s0b.obs, s1b.obs))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert s1.obs["image"].shape == (3, 64, 64, 3) and s1.obs["image"].dtype == jnp.uint8
  assert s1.obs["state"].shape == (3, spec.state_dim) and s1.obs["state"].dtype == jnp.float32
  assert np.all(np.asarray(s1.step) == 1) and s1.reward.shape == (3,) and s1.done.dtype == jnp.bool_
  assert np.all(np.isfinite(np.asarray(s1.obs["state"])))
  # Different keys give different tasks/observations; the step changed the state.
  assert not np.array_equal(np.asarray(s0.obs["image"][0]), np.asarray(s0.obs["image"][1]))
  assert not np.array_equal(np.asarray(s0.obs["state"]), np.asarray(s1.obs["state"]))
  texts = env.instruction(s0)
  assert isinstance(texts, list) and len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
  one = jax.tree_util.tree_map(lambda x: x[0], s0)
  assert env.instruction(one) == texts[0]


def test_brax_bodies_reject_heldout_combo():
  with pytest.raises(ValueError, match="task_split='heldout_combo'.*train"):
    make("reacher").reset(jax.random.PRNGKey(0), "heldout_combo")
  with pytest.raises(ValueError, match="unknown task_split='test'"):
    make("grid_goto").reset(jax.random.PRNGKey(0), "test")


def _objects(grid):
  """Set of (tile, colour) of the objects on a grid [H, W, 2]."""
  kinds = np.isin(grid[..., 0], OBJECT_TILES)
  return {tuple(int(v) for v in t) for t in grid[kinds]}


def test_grid_splits_hold_out_combinations():
  env = make("grid_putnext")
  keys = jax.random.split(jax.random.PRNGKey(7), 64)
  held = {(OBJECT_TILES[o], COLOUR_IDS[c]) for (o, c), h in zip(_COMBOS, _HELDOUT) if h}
  assert len(held) == len(HELDOUT_COMBOS)
  reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)), static_argnums=1)
  for split in ("train", "heldout_seed"):
    s = jax.device_get(reset(keys, split))
    for i in range(len(keys)):
      objs = _objects(s.inner["grid"][i])
      assert len(objs) == env.num_objects  # all distinct
      assert not (objs & held), f"held-out combination seen in split {split}"
  s = jax.device_get(reset(keys, "heldout_combo"))
  for i in range(len(keys)):
    assert tuple(int(v) for v in s.task["obj_a"][i]) in held
  # Unseen seeds: the same key gives another layout in the held-out stream.
  a = jax.device_get(reset(keys, "train")).inner["grid"]
  b = jax.device_get(reset(keys, "heldout_seed")).inner["grid"]
  assert not np.array_equal(a, b)


def test_grid_instruction_names_the_objects_on_the_grid():
  env = make("grid_putnext")
  s = jax.device_get(jax.jit(env.reset)(jax.random.PRNGKey(3)))
  text = env.instruction(s)
  a, b = env.object_words(s.task["obj_a"]), env.object_words(s.task["obj_b"])
  assert text == f"put the {a} next to the {b}"
  objs = _objects(s.inner["grid"])
  assert tuple(s.task["obj_a"]) in objs and tuple(s.task["obj_b"]) in objs


def test_grid_putnext_success_needs_a_real_drop():
  """Dropping with an empty pocket in front of the first object never counts, even if it touches the second."""
  from xminigrid.core.constants import Tiles
  from xminigrid.types import AgentState

  env = make("grid_putnext")
  s = jax.jit(env.reset)(jax.random.PRNGKey(0))
  a, b = np.asarray(s.task["obj_a"]), np.asarray(s.task["obj_b"])
  grid = np.asarray(make("grid_goto")._empty_grid).copy()
  grid[2, 3], grid[2, 4] = a, b  # a already next to b
  agent = AgentState(position=jnp.array([3, 3]), direction=jnp.asarray(0),
                     pocket=jnp.array([Tiles.EMPTY, 0], jnp.uint8))  # facing a (up)
  s = s.replace(inner={"grid": jnp.asarray(grid), "agent": agent})
  step = jax.jit(env.step)
  s1 = step(s, 4)  # drop with nothing held
  assert not bool(s1.success)
  s2 = step(s1, 3)  # pick a up
  assert tuple(np.asarray(s2.inner["agent"].pocket)) == tuple(a)
  s3 = step(s2, 4)  # put it back next to b
  assert bool(s3.success) and bool(s3.done) and bool(s3.terminal) and float(s3.reward) > 0


def test_grid_doors_are_reachable_locked_landmarks_and_goto_targets():
  """Doors sit in the walls (never corners) with a free floor cell inside; toggling one changes nothing;
  grid_goto sometimes asks for a door and the planner reaches it; held-out combos never target a door."""
  from xminigrid.core.constants import Tiles
  from xminigrid.types import AgentState

  from data_pipelines import experts
  env = make("grid_goto")
  g = env.grid_size - 1
  keys = jax.random.split(jax.random.PRNGKey(11), 48)
  reset = jax.jit(jax.vmap(env.reset, in_axes=(0, None)), static_argnums=1)
  s = jax.device_get(reset(keys, "train"))
  door_targets = 0
  for i in range(len(keys)):
    grid = s.inner["grid"][i]
    doors = np.argwhere(grid[..., 0] == Tiles.DOOR_LOCKED)
    assert len(doors) == env.num_doors
    assert len({int(grid[r, c, 1]) for r, c in doors}) == env.num_doors  # distinct colours
    for r, c in doors:
      assert r in (0, g) or c in (0, g)
      assert (r, c) not in {(0, 0), (0, g), (g, 0), (g, g)}
      inside = (min(max(r, 1), g - 1), min(max(c, 1), g - 1))
      assert grid[inside][0] == Tiles.FLOOR
    if int(s.task["obj_a"][i][0]) == Tiles.DOOR_LOCKED:
      door_targets += 1
      assert env.instruction(jax.tree.map(lambda x, i=i: x[i], s)).endswith(" door")
  assert 5 <= door_targets <= 30  # door_target_prob = 1/3 of 48
  held = jax.device_get(reset(keys, "heldout_combo"))
  assert not np.any(held.task["obj_a"][:, 0] == Tiles.DOOR_LOCKED)

  # toggling a door in front of the agent leaves the grid as it was (with a key of the door's colour too)
  one = jax.device_get(env.reset(jax.random.PRNGKey(0)))
  grid = np.asarray(one.inner["grid"]).copy()
  r, c = np.argwhere(grid[..., 0] == Tiles.DOOR_LOCKED)[0]
  inside = (min(max(r, 1), g - 1), min(max(c, 1), g - 1))
  grid[inside] = (Tiles.FLOOR, 0)
  facing = {(-1, 0): 0, (0, 1): 1, (1, 0): 2, (0, -1): 3}[(int(r - inside[0]), int(c - inside[1]))]
  agent = AgentState(position=jnp.asarray(inside), direction=jnp.asarray(facing),
                     pocket=jnp.asarray([Tiles.KEY, int(grid[r, c, 1])], jnp.uint8))
  st = one.replace(inner={"grid": jnp.asarray(grid), "agent": agent})
  after = jax.jit(env.step)(st, 5)  # toggle
  np.testing.assert_array_equal(np.asarray(after.inner["grid"]), grid)

  eps = experts.rollout("grid_goto", 24, seed=3)
  assert all(e["success"] for e in eps)
  assert any(e["instruction"].endswith(" door") for e in eps)


def test_grid_target_point_is_the_named_objects_cell_and_minus_one_when_held():
  """`target_point` (the grounding loss's label) is the centre of the cell holding the instruction's object, in
  (row, col) fractions of the image; (-1, -1) once it is in the pocket; the default for other bodies is -1."""
  from xminigrid.core.constants import Tiles
  from xminigrid.types import AgentState

  env = make("grid_goto")
  keys = jax.random.split(jax.random.PRNGKey(5), 16)
  s = jax.device_get(jax.vmap(env.reset)(keys))
  points = np.asarray(jax.vmap(env.target_point)(jax.vmap(env.reset)(keys)))
  g = env.grid_size
  for i in range(len(keys)):
    grid = s.inner["grid"][i]
    (r, c), = np.argwhere((grid == s.task["obj_a"][i]).all(-1))
    np.testing.assert_allclose(points[i], [(r + 0.5) / g, (c + 0.5) / g])
    # the rendered frame's cell around the point is the named object's (or door's) picture
    y, x = (points[i] * env.image_size).astype(int) // env.cell * env.cell
    img = np.asarray(env.render(grid, jax.tree.map(lambda a, i=i: a[i], s.inner["agent"])))
    tile, colour = (int(v) for v in s.task["obj_a"][i])
    np.testing.assert_array_equal(img[y:y + env.cell, x:x + env.cell], env._tiles[tile, colour])

  pick = make("grid_pickup")
  s = pick.reset(jax.random.PRNGKey(0))
  a = np.asarray(s.task["obj_a"])
  grid = np.asarray(pick._empty_grid).copy()
  grid[2, 3] = a
  agent = AgentState(position=jnp.array([3, 3]), direction=jnp.asarray(0),
                     pocket=jnp.array([Tiles.EMPTY, 0], jnp.uint8))  # facing the object (up)
  s = s.replace(inner={"grid": jnp.asarray(grid), "agent": agent})
  np.testing.assert_allclose(np.asarray(pick.target_point(s)), [2.5 / pick.grid_size, 3.5 / pick.grid_size])
  held = jax.jit(pick.step)(s, 3)  # pick it up
  np.testing.assert_array_equal(np.asarray(pick.target_point(held)), [-1.0, -1.0])
  r = make("reacher")
  np.testing.assert_array_equal(np.asarray(r.target_point(r.reset(jax.random.PRNGKey(0)))), [-1.0, -1.0])


def test_grid_ego_view_turns_the_frame_so_the_agent_faces_up():
  """`grid_*_ego`: same tasks and dynamics as the top-down bodies; the frame is turned so that the cell the agent faces
  is the one drawn above it (checked from pixels, for each facing) and the one `front_tile` reads, and
  `target_point` lands on the named object's picture in the turned frame."""
  from xminigrid.core.constants import Tiles
  from xminigrid.types import AgentState

  top, ego = make("grid_goto"), make("grid_goto_ego")
  assert ego.spec.name == "grid_goto_ego" and "faces up" in ego.spec.description
  assert ego.spec.image_shape == top.spec.image_shape and ego.spec.state_dim == top.spec.state_dim
  c = ego.cell
  s = ego.reset(jax.random.PRNGKey(3))
  tile = np.asarray(s.task["obj_a"])
  grid = np.asarray(ego._empty_grid).copy()
  step, top_step = jax.jit(ego.step), jax.jit(top.step)
  for direction, (dr, dc) in enumerate(((-1, 0), (0, 1), (1, 0), (0, -1))):
    g = grid.copy()
    g[3 + dr, 4 + dc] = tile  # the named object in the cell the agent faces
    agent = AgentState(position=jnp.array([3, 4]), direction=jnp.asarray(direction),
                       pocket=jnp.array([Tiles.EMPTY, 0], jnp.uint8))
    st = s.replace(inner={"grid": jnp.asarray(g), "agent": agent})
    assert int(ego.front_tile(st)) == tile[0]  # the tile it faces, for each facing
    np.testing.assert_array_equal(np.asarray(ego.front_cell(st)), tile)  # and its colour
    assert int(ego.front_tile(st.replace(inner={"grid": jnp.asarray(grid), "agent": agent}))) == Tiles.FLOOR
    img = np.asarray(ego._obs(st.inner["grid"], agent)["image"])
    # the agent's own cell: the up-pointing triangle
    (ar, ac), = {tuple(rc // c) for rc in np.argwhere((img == 250).all(-1))}
    assert np.array_equal((img[ar * c:(ar + 1) * c, ac * c:(ac + 1) * c] == 250).all(-1), ego._agent[0])
    # the object it faces is drawn directly above it (its picture turned with the frame), and target_point is there
    np.testing.assert_array_equal(img[(ar - 1) * c:ar * c, ac * c:(ac + 1) * c],
                                  np.rot90(ego._tiles[tile[0], tile[1]], direction))
    np.testing.assert_allclose(np.asarray(ego.target_point(st)) * ego.grid_size, [ar - 0.5, ac + 0.5])
    # the same dynamics as the top-down body: every action moves both alike, and the turned frame follows the facing
    for action in range(6):
      a, b = step(st, action), top_step(st, action)
      assert jax.tree.all(jax.tree.map(np.array_equal, (a.inner, a.success), (b.inner, b.success)))
      np.testing.assert_array_equal(a.obs["image"], np.rot90(b.obs["image"], int(b.inner["agent"].direction)))
