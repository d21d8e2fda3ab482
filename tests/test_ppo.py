"""PPO core: losses and their gradients, action distributions, normalization, learning, sharding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gea_jax import sharding as shd
from gea_jax.rl import normalization as norm
from gea_jax.rl.brax_env import BraxVecEnv
from gea_jax.rl.distributions import Categorical, TanhNormal
from gea_jax.rl.losses import clipped_surrogate_loss, ppo_loss, value_loss
from gea_jax.rl.networks import ActorCritic
from gea_jax.rl.ppo import PPO, PPOConfig, episode_summary, sgd_epochs
from gea_jax.rl.toy_envs import PointMass

# --- losses -------------------------------------------------------------------------------------------


def test_clipped_surrogate_value_and_gradient_on_known_inputs():
  ratios = np.array([1.5, 0.5, 1.1, 0.9, 0.5, 1.5])
  adv = jnp.array([1.0, 1.0, -1.0, -1.0, -1.0, -1.0])
  old = jnp.zeros(6)
  logp = jnp.log(jnp.asarray(ratios))
  # min(rA, clip(r, 0.8, 1.2)A) = [1.2 (clipped), 0.5, -1.1, -0.9, -0.8 (clipped), -1.5]
  loss, stats = clipped_surrogate_loss(logp, old, adv, 0.2)
  np.testing.assert_allclose(float(loss), 2.6 / 6, rtol=1e-6)
  np.testing.assert_allclose(float(stats["clip_fraction"]), 4 / 6, rtol=1e-6)
  grad = jax.grad(lambda lp: clipped_surrogate_loss(lp, old, adv, 0.2)[0])(logp)
  # d/dlogp of -r A / N where the unclipped term is active, 0 where the clipped one is.
  expected = np.array([0.0, -0.5, 1.1, 0.9, 0.0, 1.5]) / 6
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-5, atol=1e-7)


def test_value_loss_clipped_and_unclipped():
  v = jnp.array([1.0, 3.0, 0.0])
  old = jnp.array([0.0, 2.0, 0.0])
  target = jnp.array([2.0, 0.0, 1.0])
  # unclipped: 0.5 * mean([1, 9, 1])
  np.testing.assert_allclose(float(value_loss(v, old, target, None)), 0.5 * 11 / 3, rtol=1e-6)
  # clipped prediction (eps 0.5): [0.5, 2.5, 0] -> errors^2 [2.25, 6.25, 1]; max with unclipped [2.25, 9, 1]
  np.testing.assert_allclose(float(value_loss(v, old, target, 0.5)), 0.5 * 12.25 / 3, rtol=1e-6)
  g = jax.grad(lambda x: value_loss(x, old, target, 0.5))(v)
  # sample 0: clipped branch wins (pred frozen at old+eps) -> 0 ; sample 1: unclipped -> (3 - 0) / 3 ;
  # sample 2: both equal (within clip) -> gradient of the shared value (0 - 1) / 3.
  np.testing.assert_allclose(np.asarray(g), [0.0, 1.0, -1 / 3], rtol=1e-5, atol=1e-7)


def test_sgd_epochs_passes_each_step_its_own_per_step_slice_in_order():
  """``per_step`` leaves ``[num_epochs, num_minibatches, ...]``: step (e, m) gets slice [e, m], in that order (the
  slices are not shuffled). With loss 0.5 (w - x)^2 and SGD at lr 0.5 each step sets w to (w + x) / 2, so the result
  depends on the order; wrongly shaped slices are refused naming both shapes."""
  import optax
  xs = jnp.arange(6.0).reshape(2, 3) + 1.0  # 2 epochs x 3 minibatches

  def loss_fn(w, mb, key, x):
    del key
    loss = 0.5 * jnp.square(w - x) + 0.0 * jnp.sum(mb)
    return loss, {"x": x}

  w, _, metrics = sgd_epochs(loss_fn, optax.sgd(0.5), jnp.float32(0.0), optax.sgd(0.5).init(jnp.float32(0.0)),
                             jnp.zeros(6), jax.random.key(0), num_epochs=2, num_minibatches=3, per_step=xs)
  expect = 0.0
  for x in np.asarray(xs).reshape(-1):
    expect = (expect + x) / 2
  np.testing.assert_allclose(float(w), expect, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["x"]), 3.5)
  with pytest.raises(ValueError, match=r"per_step leaves must start with \(num_epochs, num_minibatches\)"):
    sgd_epochs(loss_fn, optax.sgd(0.5), jnp.float32(0.0), optax.sgd(0.5).init(jnp.float32(0.0)), jnp.zeros(6),
               jax.random.key(0), num_epochs=3, num_minibatches=2, per_step=xs)


def test_ppo_loss_combines_terms():
  lp = jnp.array([0.1, -0.2])
  total, m = ppo_loss(lp, jnp.zeros(2), jnp.array([1.0, -1.0]), jnp.array([0.5, 0.5]), jnp.array([0.5, 0.5]),
                      jnp.array([1.5, 0.5]), jnp.array([0.7, 0.9]), clip_eps=0.2, value_clip_eps=None,
                      vf_coef=0.5, entropy_coef=0.01, normalize_advantage=False)
  np.testing.assert_allclose(float(total), float(m["policy_loss"] + 0.5 * m["value_loss"] - 0.01 * 0.8),
                             rtol=1e-6)
  np.testing.assert_allclose(float(m["value_loss"]), 0.25, rtol=1e-6)


# --- distributions ------------------------------------------------------------------------------------


def _normal_cdf(x):
  return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def test_tanh_normal_log_prob_matches_numerical_density():
  loc = jnp.array([[0.3, -1.2]])
  scale = jnp.array([[0.7, 0.4]])
  dist = TanhNormal(loc=loc, scale=scale)
  for u in ([0.1, -0.5], [1.3, -2.0], [-0.8, 0.9]):
    u = jnp.array([u])
    got = float(dist.log_prob(u)[0])
    # density of y = tanh(u) via a central difference of P(Y <= y) = Phi((arctanh y - mu) / sigma)
    ref = 0.0
    for d in range(2):
      y = math.tanh(float(u[0, d]))
      h = 1e-5 * (1 - y * y)
      mu, sigma = float(loc[0, d]), float(scale[0, d])
      cdf = lambda yy, mu=mu, sigma=sigma: _normal_cdf((math.atanh(yy) - mu) / sigma)
      ref += math.log((cdf(y + h) - cdf(y - h)) / (2 * h))
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # and it integrates to one over (-1, 1) (1-D marginal, trapezoid in u-space)
  d1 = TanhNormal(loc=jnp.array([0.4]), scale=jnp.array([0.6]))
  us = np.linspace(-6, 6, 20001)
  dens = np.exp(np.asarray(jax.vmap(lambda x: d1.log_prob(x[None]))(jnp.asarray(us, jnp.float32))))
  jac = 1 - np.tanh(us) ** 2  # p_Y(tanh u) * dy/du integrates p_Y over y
  np.testing.assert_allclose(np.trapezoid(dens * jac, us), 1.0, atol=1e-3)


def test_tanh_normal_sampling_and_entropy():
  dist = TanhNormal.from_params(jnp.zeros((4096, 6)))  # loc 0, std softplus(0) + 1e-3
  raw = dist.sample(jax.random.key(0))
  a = dist.to_action(raw)
  assert raw.shape == (4096, 3) and float(jnp.max(jnp.abs(a))) < 1.0
  np.testing.assert_allclose(float(jnp.std(raw)), math.log(2) + 1e-3, rtol=0.05)
  # Monte Carlo entropy of tanh(N(0, s)) vs mean of -log_prob over samples
  mc = -float(jnp.mean(dist.log_prob(raw)))
  est = float(jnp.mean(dist.entropy(jax.random.key(1))))
  np.testing.assert_allclose(est, mc, rtol=0.05)


def test_categorical():
  logits = jnp.log(jnp.array([[0.2, 0.3, 0.5]]))
  d = Categorical.from_params(logits)
  np.testing.assert_allclose(np.asarray(d.log_prob(jnp.array([2]))), [math.log(0.5)], rtol=1e-6)
  ent = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
  np.testing.assert_allclose(float(d.entropy()[0]), ent, rtol=1e-6)
  samples = Categorical.from_params(jnp.broadcast_to(logits, (20000, 3))).sample(jax.random.key(0))
  np.testing.assert_allclose(np.bincount(np.asarray(samples), minlength=3) / 20000, [0.2, 0.3, 0.5], atol=0.015)


# --- normalization ------------------------------------------------------------------------------------


def test_running_stats_match_numpy():
  rng = np.random.default_rng(0)
  batches = [rng.normal(3.0, 2.0, size=(n, 5)).astype(np.float32) for n in (7, 50, 1, 13)]
  stats = norm.init_stats(5)
  x0 = jnp.asarray(batches[0])
  np.testing.assert_allclose(np.asarray(norm.normalize(stats, x0)), batches[0], rtol=1e-6)  # identity at start
  for b in batches:
    stats = norm.update_stats(stats, jnp.asarray(b))
  allx = np.concatenate(batches)
  np.testing.assert_allclose(np.asarray(stats.mean), allx.mean(0), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(norm.std(stats)), allx.std(0), rtol=1e-4)
  z = np.asarray(norm.normalize(stats, jnp.asarray(allx)))
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)


# --- learning on a toy task ---------------------------------------------------------------------------


def _point_mass_ppo(discrete=False, mesh=None, num_envs=32, shuffle_blocks=1, iterations_per_call=4):
  cfg = PPOConfig(num_envs=num_envs, unroll_length=16, batch_size=num_envs, num_minibatches=4, num_epochs=4,
                  learning_rate=3e-3, entropy_coef=1e-3, discount=0.95, reward_scaling=0.1,
                  iterations_per_call=iterations_per_call, shuffle_blocks=shuffle_blocks, max_grad_norm=1.0)
  env = BraxVecEnv(PointMass(discrete=discrete), cfg.num_envs, episode_length=50)
  head = "categorical" if discrete else "tanh_normal"
  ppo = PPO(cfg, env, lambda r: ActorCritic(4, env.action_size, action_head=head, policy_hidden=(32, 32),
                                            value_hidden=(32, 32), rngs=r), mesh=mesh)
  return ppo


@pytest.mark.parametrize("discrete", [False, True])
def test_ppo_learns_point_mass(discrete):
  ppo = _point_mass_ppo(discrete)
  state = ppo.init(jax.random.key(0))
  returns = []
  for _ in range(12):
    state, metrics = ppo.train_step(state)
    assert np.isfinite(float(metrics["loss"]))
    returns.append(episode_summary(metrics)["episode_return"])
  first, last = np.nanmean(returns[:2]), np.nanmean(returns[-2:])
  # a random walk averages about -30 per 50-step episode; reaching the goal quickly gives > 0
  assert last > first + 10, returns
  assert int(state.iteration) == 12 * 4


def test_sharded_step_equals_single_device_step():
  assert len(jax.devices()) >= 8, "tests/conftest.py should provide 8 fake CPU devices"
  mesh8 = shd.make_mesh((8, 1, 1))
  mesh1 = shd.make_mesh((1, 1, 1), jax.devices()[:1])
  out = {}
  for name, mesh in (("single", mesh1), ("sharded", mesh8)):
    ppo = _point_mass_ppo(mesh=mesh, num_envs=16, shuffle_blocks=8, iterations_per_call=2)
    state = ppo.init(jax.random.key(3))
    state, metrics = ppo.train_step(state)
    out[name] = (state, metrics)
  s1, m1 = out["single"]
  s8, m8 = out["sharded"]
  obs8 = s8.env_state.obs
  assert len(obs8.sharding.device_set) == 8 and obs8.addressable_shards[0].data.shape[0] == 2
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s8.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(np.asarray(s1.obs_stats.mean), np.asarray(s8.obs_stats.mean), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s1.env_state.obs), np.asarray(obs8), rtol=1e-4, atol=1e-5)
  for k in ("loss", "episode_return_sum", "episodes"):
    np.testing.assert_allclose(float(m1[k]), float(m8[k]), rtol=1e-4, atol=1e-5)
  # the step changed the parameters (the comparison above is not between two untouched inits)
  init = _point_mass_ppo(mesh=mesh1, num_envs=16, shuffle_blocks=8).init(jax.random.key(3))
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(init.params),
                                                          jax.tree.leaves(s1.params)))
  assert diff > 1e-4


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="multiple of ppo.num_envs"):
    PPOConfig(num_envs=48, batch_size=32, num_minibatches=1).validate()
  with pytest.raises(ValueError, match="ppo.discount"):
    PPOConfig(discount=1.5).validate()
  env = BraxVecEnv(PointMass(), 12, episode_length=10)
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    PPO(PPOConfig(num_envs=12, batch_size=12, num_minibatches=1), env,
        lambda r: ActorCritic(4, 2, rngs=r), mesh=shd.make_mesh((8, 1, 1)))


# --- a real task: Brax inverted_pendulum --------------------------------------------------------------


@pytest.mark.slow
def test_tiny_mlp_ppo_solves_brax_inverted_pendulum(xla_optimized):
  from gea_jax.rl.brax_env import make_brax_env
  cfg = PPOConfig(num_envs=128, unroll_length=5, batch_size=128, num_minibatches=8, num_epochs=4,
                  learning_rate=1e-3, entropy_coef=1e-2, discount=0.97, reward_scaling=10.0, iterations_per_call=8)
  env = BraxVecEnv(make_brax_env("inverted_pendulum", "positional"), cfg.num_envs, episode_length=1000)
  ppo = PPO(cfg, env, lambda r: ActorCritic(env.observation_size, env.action_size, policy_hidden=(32, 32),
                                            value_hidden=(64, 64), rngs=r))
  state = ppo.init(jax.random.key(0))
  max_env_steps = 600_000
  steps, history = 0, []
  while steps < max_env_steps:
    state, metrics = ppo.train_step(state)
    steps += ppo.env_steps_per_iteration * cfg.iterations_per_call
    ret = episode_summary(metrics)["episode_return"]
    history.append(round(ret, 1))
    if ret >= 900:
      break
  assert ret >= 900, f"no solve within {max_env_steps} env steps; returns per call: {history}"
