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


@pytest.mark.parametrize("name", ["grid_goto", "grid_pickup", "grid_putnext"])
def test_grid_planner_solves_every_solvable_task(name):
  env = make(name)
  family = name.removeprefix("grid_")
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
def test_pusher_scripted_expert_pushes_the_puck():
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
def test_halfcheetah_ppo_expert_runs_past_the_flag():
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
  with pytest.raises(ValueError, match="continuous actions"):
    experts.rollout("grid_goto", 2, action_noise=0.1)
  with pytest.raises(ValueError, match="action_noise must be >= 0"):
    experts.rollout("reacher", 2, action_noise=-0.1)
