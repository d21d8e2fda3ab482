"""GAE against a hand-written numpy loop, with terminations, truncations and auto-reset boundaries."""

import jax.numpy as jnp
import numpy as np
import pytest

from gea_jax.rl.gae import compute_gae


def gae_reference(rewards, values, bootstrap, term, trunc, gamma, lam):
  """Backward loop over time for each env: the textbook recursion, written without vectorization."""
  T, B = rewards.shape
  adv = np.zeros((T, B))
  for b in range(B):
    acc = 0.0
    for t in reversed(range(T)):
      next_v = bootstrap[b] if t == T - 1 else values[t + 1, b]
      if trunc[t, b]:
        acc = 0.0  # time-limit step: next value belongs to the next episode, no signal
      elif term[t, b]:
        acc = rewards[t, b] - values[t, b]  # terminal: no bootstrap, chain cut
      else:
        delta = rewards[t, b] + gamma * next_v - values[t, b]
        acc = delta + gamma * lam * acc
      adv[t, b] = acc
  return adv, adv + values


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 1.0), (0.97, 0.0)])
def test_gae_matches_numpy_loop(gamma, lam):
  rng = np.random.default_rng(0)
  T, B = 17, 6
  rewards = rng.normal(size=(T, B)).astype(np.float32)
  values = rng.normal(size=(T, B)).astype(np.float32)
  bootstrap = rng.normal(size=(B,)).astype(np.float32)
  term = rng.random((T, B)) < 0.1
  trunc = (rng.random((T, B)) < 0.1) & ~term
  adv, target = compute_gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(bootstrap),
                            jnp.asarray(term, jnp.float32), jnp.asarray(trunc, jnp.float32), gamma, lam)
  ref_adv, ref_target = gae_reference(rewards, values, bootstrap, term, trunc, gamma, lam)
  np.testing.assert_allclose(np.asarray(adv), ref_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(target), ref_target, rtol=1e-5, atol=1e-5)


def test_gae_hand_computed_two_steps():
  # r = [1, 2], V = [0.5, 0.25], V(s_2) = 1, gamma = 0.5, lambda = 0.5, no episode end:
  # delta_1 = 2 + 0.5 * 1 - 0.25 = 2.25 ; A_1 = 2.25
  # delta_0 = 1 + 0.5 * 0.25 - 0.5 = 0.625 ; A_0 = 0.625 + 0.25 * 2.25 = 1.1875
  adv, target = compute_gae(jnp.array([[1.0], [2.0]]), jnp.array([[0.5], [0.25]]), jnp.array([1.0]),
                            jnp.zeros((2, 1)), jnp.zeros((2, 1)), 0.5, 0.5)
  np.testing.assert_allclose(np.asarray(adv)[:, 0], [1.1875, 2.25], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(target)[:, 0], [1.6875, 2.5], rtol=1e-6)


def test_gae_rejects_bad_shapes():
  with pytest.raises(ValueError, match="bootstrap_value"):
    compute_gae(jnp.zeros((3, 2)), jnp.zeros((3, 2)), jnp.zeros((3,)), jnp.zeros((3, 2)), jnp.zeros((3, 2)),
                0.9, 0.9)
