"""Experts: the grid planner solves every solvable task, the reacher controller succeeds, episode format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import experts
from data_pipelines.experts.grid_planner import bfs, plan
from gea_jax.envs import make
from gea_jax.envs.grid import DROP, FORWARD, LEFT, PICKUP, RIGHT

EPISODE_KEYS = {"image", "state", "action", "reward", "discount", "is_first", "is_last", "is_terminal",
                "target_point", "instruction", "embodiment", "task", "seed", "expert", "success"}


def _check_episode(ep, spec):
  assert set(ep) == EPISODE_KEYS
  t = len(ep["reward"])
  assert t >= 2
  assert ep["image"].shape == (t, *spec.image_shape) and ep["image"].dtype == np.uint8
  assert ep["state"].shape == (t, spec.state_dim) and ep["state"].dtype == np.float32
  if spec.action_space.is_continuous:
    assert ep["action"].shape == (t, spec.action_space.dim) and ep["action"].dtype == np.float32
    assert np.all(np.abs(ep["action"]) <= 1.0)
  else:
    assert ep["action"].shape == (t, 1) and ep["action"].dtype == np.int32
  for k in ("is_first", "is_last", "is_terminal"):
    assert ep[k].shape == (t,) and ep[k].dtype == np.bool_
  assert ep["is_first"][0] and ep["is_first"].sum() == 1
  assert ep["is_last"][-1] and ep["is_last"].sum() == 1
  assert ep["is_terminal"].sum() == int(ep["success"]) and (not ep["success"] or ep["is_terminal"][-1])
  assert ep["discount"][-1] == (0.0 if ep["success"] else 1.0) and np.all(ep["discount"][:-1] == 1.0)
  assert ep["reward"][-1] == 0.0
  assert t - 1 <= spec.max_episode_steps
  assert isinstance(ep["instruction"], str) and ep["instruction"]
  tp = ep["target_point"]
  assert tp.shape == (t, 2) and tp.dtype == np.float32
  assert np.all((tp == -1) | ((tp >= 0) & (tp <= 1)))
  assert spec.name.startswith("grid") or (tp == -1).all()
  if spec.name == "grid_goto":  # the named object never moves: one point for the whole episode, inside the image
    assert (tp >= 0).all() and (tp == tp[0]).all()


@pytest.mark.parametrize("name", ["grid_goto", "grid_pickup", "grid_putnext", "grid_pickup_ego"])
def test_grid_planner_solves_every_solvable_task(name):
  env = make(name)
  family = name.removeprefix("grid_").removesuffix("_ego")
  splits = (("train", 48), ("heldout_combo", 16)) if family == "putnext" else (("train", 48),)
  for split, n in splits:
    eps = experts.rollout(name, n, seed=100, task_split=split, batch_size=16)
    assert len(eps) == n
    for ep in eps:
      _check_episode(ep, env.spec)
      if not ep["success"]:  # only allowed when the planner proves the task unsolvable
        s = jax.device_get(env.reset(jax.random.PRNGKey(ep["seed"]), split))
        a = s.inner["agent"]
        assert plan(family, s.inner["grid"], a.position, int(a.direction), a.pocket, s.task["obj_a"],
                    s.task["obj_b"]) is None
    assert np.mean([e["success"] for e in eps]) >= 0.9
    assert {e["expert"] for e in eps} == {"bfs_planner"} and {e["task"] for e in eps} == {family}


def test_grid_expert_act_follows_the_plan():
  env = make("grid_putnext")
  ex = experts.get("grid_putnext")
  assert not ex.jittable and ex.name == "bfs_planner"
  s = jax.jit(env.reset)(jax.random.PRNGKey(11))
  p = ex.plan(s)
  assert p and p[-1] == DROP and PICKUP in p
  step = jax.jit(env.step)
  for _ in range(len(p)):  # closed loop: re-plan at every step
    s = step(s, ex.act(s, None))
  assert bool(s.success) and int(s.step) == len(p)


def test_bfs_shortest_and_unsolvable():
  from xminigrid.core.constants import Tiles
  grid = np.zeros((5, 5, 2), np.uint8)
  grid[..., 0] = Tiles.FLOOR
  grid[0, :, 0] = grid[-1, :, 0] = grid[:, 0, 0] = grid[:, -1, 0] = Tiles.WALL
  # From (3,1) facing up, face the cell (1,3): forward, right, forward (now at (2,2)? no: facing right)...
  p = bfs(grid, (3, 1, 0), lambda r, c, d: (r + (-1, 0, 1, 0)[d], c + (0, 1, 0, -1)[d]) == (1, 3))
  assert len(p) == 4 and p.count(FORWARD) == 3  # e.g. forward, right, forward, forward... 3 moves + 1 turn
  walled = grid.copy()
  walled[1:4, 2, 0] = Tiles.WALL
  assert bfs(walled, (2, 1, 0), lambda r, c, d: c == 3) is None
  assert bfs(grid, (2, 2, 1), lambda r, c, d: d == 1) == []
  assert set(p) <= {FORWARD, LEFT, RIGHT}


def test_reacher_expert_success_and_determinism():
  spec = make("reacher").spec
  eps = experts.rollout("reacher", 16, seed=0, batch_size=16)
  for ep in eps:
    _check_episode(ep, spec)
  rate = np.mean([e["success"] for e in eps])
  assert rate >= 0.9, rate
  # the success-only program (no rendering) agrees episode for episode with the full rollout
  assert experts.success_rate("reacher", 16, seed=0, batch_size=16) == rate
  again = experts.rollout("reacher", 2, seed=0, batch_size=16)  # same compiled program, same seeds
  for a, b in zip(eps[:2], again):
    for k in ("image", "state", "action", "reward"):
      np.testing.assert_array_equal(a[k], b[k])
    assert a["instruction"] == b["instruction"]
  assert not np.array_equal(eps[0]["state"][0], eps[1]["state"][0])
  assert len({e["instruction"] for e in eps}) > 1


@pytest.mark.slow
def test_pusher_scripted_expert_pushes_the_puck(xla_optimized):
  spec = make("pusher").spec
  eps = experts.rollout("pusher", 16, seed=0, batch_size=16)
  for ep in eps:
    _check_episode(ep, spec)
  assert {e["expert"] for e in eps} == {"jacobian_push"}
  # About 65% measured on 512 fresh episodes; a broken controller (puck never reaches the goal) scores 0.
  assert np.mean([e["success"] for e in eps]) >= 0.3
  # The puck (state[17:19]) moves in most episodes.
  moved = [np.linalg.norm(e["state"][-1, 17:19] - e["state"][0, 17:19]) > 0.02 for e in eps]
  assert np.mean(moved) >= 0.5


@pytest.mark.slow
def test_halfcheetah_ppo_expert_runs_past_the_flag(xla_optimized):
  from data_pipelines.experts import halfcheetah as hc_expert
  assert hc_expert.ASSET.is_file(), "the packaged halfcheetah policy is missing"
  spec = make("halfcheetah").spec
  eps = experts.rollout("halfcheetah", 8, seed=0, batch_size=8)
  for ep in eps:
    _check_episode(ep, spec)
  assert {e["expert"] for e in eps} == {"ppo_mlp"}
  # Measured 100% on 64 episodes (docs/benchmarks.md); a policy that does not run forward scores 0.
  assert np.mean([e["success"] for e in eps]) >= 0.75


def test_registry_errors_and_register_policy(monkeypatch):
  from data_pipelines.experts import base
  monkeypatch.setattr(base, "_EXPERTS", dict(base._EXPERTS))  # keep the real experts for other tests
  with pytest.raises(KeyError, match="no expert for embodiment 'nope'"):
    experts.get("nope")
  with pytest.raises(KeyError, match="unknown embodiment 'nope'"):
    experts.register_policy("nope", lambda s, k: 0)
  fn = lambda s, k: jnp.zeros(6)
  ex = experts.register_policy("halfcheetah", fn, expert_name="ppo_mlp")
  assert experts.get("halfcheetah") is ex and ex.act is fn and ex.name == "ppo_mlp"
  assert "halfcheetah" in experts.names()
  with pytest.raises(ValueError, match="already has an expert"):
    experts.register_policy("halfcheetah", fn, overwrite=False)
  with pytest.raises(ValueError, match="num_episodes must be >= 0"):
    experts.rollout("reacher", -1)


def test_reacher_dart_noise_records_the_clean_expert_action():
  """action_noise: the arm executes noisy torques (its path leaves the clean one) while every recorded action is
  the expert's own PD action for the recorded observation (recomputed here from the observation alone)."""
  from data_pipelines.experts.reacher import KD, KP, ik

  clean = experts.rollout("reacher", 4, seed=0, batch_size=16)  # the program of the test above
  noisy = experts.rollout("reacher", 4, seed=0, batch_size=16, action_noise=0.5)
  assert {e["expert"] for e in noisy} == {"ik_pd+dart0.5"}
  for c, n in zip(clean, noisy):
    np.testing.assert_array_equal(c["state"][0], n["state"][0])  # same reset, then the paths part
    assert c["instruction"] == n["instruction"]
    k = min(len(c["state"]), len(n["state"]))
    assert not np.allclose(c["state"][1:k], n["state"][1:k], atol=1e-3)
    s = n["state"][:-1]
    q = np.arctan2(s[:, 2:4], s[:, 0:2])  # (cos q0, cos q1, sin q0, sin q1)
    q0, q1 = ik(s[:, 4:6].T, np.where(q[:, 1] >= 0, 1.0, -1.0))
    err = np.stack([(np.asarray(q0) - q[:, 0] + np.pi) % (2 * np.pi) - np.pi, np.asarray(q1) - q[:, 1]], 1)
    np.testing.assert_allclose(n["action"][:-1], np.clip(KP * err - KD * s[:, 6:8], -1, 1), atol=2e-3)
  with pytest.raises(ValueError, match=r"action_noise of 'reacher' must be >= 0"):
    experts.rollout("reacher", 2, action_noise=-0.1)


def _pose_state(state, position, direction):
  """`state` (a grid EnvState) with the agent moved to `position`, facing `direction`."""
  agent = state.inner["agent"].replace(position=jnp.asarray(position, jnp.int32), direction=jnp.asarray(direction))
  return state.replace(inner={**state.inner, "agent": agent})


def _is_shortest_step(family, state, action, after) -> bool:
  """Whether `action`, which took `state` to `after`, is the first action of a shortest plan from `state` (the BFS
  planner as the reference)."""
  from data_pipelines.experts.grid_planner import plan_state
  before = plan_state(family, state)
  if before is None:
    return int(action) == LEFT  # unsolvable: the planner's expert turns left, so does the field
  rest = plan_state(family, after)
  return bool(after.success) or (rest is not None and len(rest) == len(before) - 1)


@pytest.mark.parametrize("name", ["grid_goto", "grid_pickup"])
def test_grid_field_expert_takes_a_shortest_path_step_everywhere(name):
  """The jittable distance-field expert, at states off the expert's path (random moves), always takes a step of a
  shortest plan by the BFS planner (or succeeds)."""
  env, family = make(name), name.removeprefix("grid_")
  ex = experts.get(name, closed_loop=True)
  assert ex.jittable and ex.name == "distance_field" and experts.get(name).name == "bfs_planner"
  n = 32
  s = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(3), n))
  act, step = jax.jit(jax.vmap(ex.act)), jax.jit(jax.vmap(env.step))
  rng = np.random.default_rng(0)
  checked = 0
  for _ in range(8):
    a = act(s, None)
    host, after, a = jax.device_get((s, step(s, a), a))  # one batched step; the BFS reference runs on the host
    for i in np.flatnonzero(~host.done):
      pick = lambda x, i=i: x[i]  # noqa: E731
      assert _is_shortest_step(family, jax.tree_util.tree_map(pick, host), a[i], jax.tree_util.tree_map(pick, after)), (i, a[i])
      checked += 1
    moves = rng.choice([FORWARD, RIGHT, LEFT], n)
    s2 = step(s, jnp.asarray(np.where(rng.random(n) < 0.5, moves, a)))
    done = s.done
    s = jax.tree_util.tree_map(lambda new, old, done=done: jnp.where(done.reshape((-1,) + (1,) * (new.ndim - 1)), old, new),
                               s2, s)
  assert checked >= 100
  with pytest.raises(KeyError, match="no closed-loop"):
    experts.get("grid_putnext", closed_loop=True)


def test_grid_dart_noise_executes_random_moves_and_records_the_experts_correction():
  """action_noise on a discrete embodiment: with that probability a random move is executed; every recorded action
  is a shortest-plan step from the recorded pose (checked against the BFS planner), and the path leaves the one the
  recorded actions would give."""
  env = make("grid_goto")
  step = jax.jit(env.step)
  clean = experts.rollout("grid_goto", 8, seed=0, batch_size=8)
  noisy = experts.rollout("grid_goto", 8, seed=0, batch_size=8, action_noise=0.4)
  assert {e["expert"] for e in clean} == {"bfs_planner"} and {e["expert"] for e in noisy} == {"distance_field+dart0.4"}
  assert np.mean([e["success"] for e in noisy]) >= 0.75
  deviations = 0
  for ep in noisy:
    _check_episode(ep, env.spec)
    s0 = env.reset(jax.random.PRNGKey(ep["seed"]))  # objects never move in go-to: the pose is the whole state
    g = env.grid_size - 1
    poses = [(np.rint(st[:2] * g).astype(int), int(np.argmax(st[2:6]))) for st in ep["state"]]
    for t, ((pos, d), a) in enumerate(zip(poses[:-1], ep["action"][:-1, 0])):
      state = _pose_state(s0, pos, d)
      after = jax.device_get(step(state, a))
      assert _is_shortest_step("goto", state, a, after), (ep["seed"], t)
      nxt = after.inner["agent"]
      deviations += not (np.array_equal(nxt.position, poses[t + 1][0]) and int(nxt.direction) == poses[t + 1][1])
  assert deviations >= 3  # executed != recorded somewhere (p = 0.4 of a random move, 1/3 of them the expert's own)
  with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
    experts.rollout("grid_goto", 2, action_noise=1.5)
  with pytest.raises(ValueError, match="no closed-loop"):
    experts.rollout("grid_putnext", 2, action_noise=0.1)
  with pytest.raises(ValueError, match="re-decides every step"):
    experts.rollout("grid_goto", 2, action_noise=0.1, expert=experts.get("grid_goto"))
