"""Potential-based reward shaping (gea_jax.rl.shaping): the grid potential against the BFS planner, the shaped reward's
telescoping sum, which bodies have a potential, and PPO's ``ppo.shaping`` config."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_pipelines.experts.grid_planner import plan_state
from gea_jax.config_validation import ConfigError
from gea_jax.envs import registry
from gea_jax.envs.grid import DIRECTIONS, FORWARD, LEFT, RIGHT
from gea_jax.rl.shaping import PotentialShaping, has_potential
from gea_jax.train import ppo


def _random_states(env, n=24, moves=6, seed=0):
  """Reset states moved by a few random turns / forward steps (poses off the expert's path)."""
  s = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(seed), n))
  step = jax.jit(jax.vmap(env.step))
  rng = np.random.default_rng(seed)
  out = [s]
  for _ in range(moves):
    s = step(s, jnp.asarray(rng.choice([FORWARD, RIGHT, LEFT], n)))
    out.append(s)
  return out


@pytest.mark.parametrize("name", ["grid_goto", "grid_pickup_ego"])
def test_grid_potential_is_minus_the_planners_path_length(name):
  """-phi = the BFS planner's number of moves to face the target (its plan minus the final pickup; at a pose already
  facing the target, phi = 0 and the go-to plan is one blocked forward)."""
  env = registry.make(name)
  family = name.removeprefix("grid_").removesuffix("_ego")
  potential = jax.jit(jax.vmap(env.shaping_potential))
  checked = 0
  for s in _random_states(env):
    phi, host = jax.device_get((potential(s), s))
    for i in np.flatnonzero(~host.done):
      one = jax.tree_util.tree_map(lambda x, i=i: x[i], host)
      plan = plan_state(family, one)
      assert plan is not None
      front = np.asarray(one.inner["agent"].position) + DIRECTIONS[int(one.inner["agent"].direction)]
      facing = bool(np.all(np.asarray(one.inner["grid"])[front[0], front[1]] == np.asarray(one.task["obj_a"])))
      moves = len(plan) - 1 if family == "pickup" else (0 if facing else len(plan))
      assert -phi[i] == moves, (i, plan, phi[i])
      checked += 1
  assert checked > 100


def test_shaped_reward_telescopes_and_vanishes_at_success():
  """sum_t discount^t (shaped_t - r_t) = discount^T phi(s_T) - phi(s_0), with phi = 0 once the episode succeeded."""
  env = registry.make("grid_goto_ego")
  coef, discount = 0.3, 0.9
  shaped = PotentialShaping(env, coef, discount)
  assert shaped.spec is env.spec and shaped.reset is not None  # everything but step is the body's
  n, T = 16, 12
  s = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(1), n))
  phi0 = jax.vmap(env.shaping_potential)(s)
  step, step_shaped = jax.jit(jax.vmap(env.step)), jax.jit(jax.vmap(shaped.step))
  from data_pipelines.experts import grid_field
  expert = jax.jit(jax.vmap(grid_field.make_expert("grid_goto").act))
  rng = np.random.default_rng(0)
  total, steps = jnp.zeros(n), jnp.zeros(n, jnp.int32)
  alive, succeeded = jnp.ones(n, bool), jnp.zeros(n, bool)
  for t in range(T):
    a = jnp.where(jnp.asarray(rng.random(n) < 0.5), expert(s), jnp.asarray(rng.choice([FORWARD, RIGHT, LEFT], n)))
    plain, nxt = step(s, a), step_shaped(s, a)
    np.testing.assert_array_equal(np.asarray(plain.success), np.asarray(nxt.success))
    total = total + jnp.where(alive, discount ** t * (nxt.reward - plain.reward), 0.0)
    succeeded = succeeded | (alive & plain.terminal)
    steps = steps + alive
    s = jax.tree_util.tree_map(lambda new, old, m=alive: jnp.where(m.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
                               plain, s)  # an episode's state stays as it ended
    alive = alive & ~plain.done
  phi_T = jnp.where(succeeded, 0.0, jax.vmap(env.shaping_potential)(s))
  expected = coef * (discount ** steps * phi_T - phi0)
  assert bool(succeeded.any()) and bool((~succeeded).any())
  np.testing.assert_allclose(np.asarray(total), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_which_bodies_have_a_potential():
  assert has_potential(registry.make("grid_goto")) and has_potential(registry.make("grid_pickup_ego"))
  assert not has_potential(registry.make("grid_putnext")) and not has_potential(registry.make("reacher"))
  with pytest.raises(ValueError, match="reacher: has no shaping_potential"):
    PotentialShaping(registry.make("reacher"), 0.1, 0.97)


def test_ppo_shaping_config_is_validated_and_wraps_only_the_named_bodies():
  p = ppo.ppo_defaults()
  p.shaping = "grid_goto_ego=0.2"
  envs = ppo.make_envs(p, ["reacher", "grid_goto_ego"])
  assert not isinstance(envs[0], PotentialShaping) and isinstance(envs[1], PotentialShaping)
  assert envs[1].coef == 0.2 and envs[1].discount == p.discount
  assert ppo.shaping_coefs(p) == {"grid_goto_ego": 0.2}
  c = ml_collections.ConfigDict({"ppo": p})
  for bad, match in (("reacher=0.1", "ppo.shaping: this embodiment has no shaping potential"),
                     ("grid_goto_ego=-1", "ppo.shaping: coefficients must be >= 0"),
                     ("grid_goto_ego=x", "ppo.shaping: expected 'name=coefficient'"),
                     ("nobody=0.1", "ppo.shaping: unknown embodiment")):
    c.ppo.shaping = bad
    with pytest.raises(ConfigError, match=match):
      ppo.shaping_coefs(c.ppo)
    with pytest.raises(ConfigError, match=match):  # also when the learner is built without ppo.validate
      ppo.make_envs(c.ppo, ["grid_goto_ego"])
