"""The MLP expert trainer end to end (train, checkpoint, load_policy, exact resume) on the toy PointMass task.

The Brax bodies go through the same code; only their compile time (a minute on 2 cores) keeps them out of here:
tests/test_ppo.py trains on Brax inverted_pendulum.
"""

import os
import signal

import jax
import numpy as np
import pytest

from gea_jax.config_validation import ConfigError
from gea_jax.train import ppo_mlp


def _tiny_config(total_env_steps, env="point_mass"):
  import importlib.util
  spec = importlib.util.spec_from_file_location("ppo_mlp_cfg", "configs/ppo_mlp.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("inverted_pendulum")
  c.ppo.num_envs, c.ppo.batch_size, c.ppo.num_minibatches, c.ppo.iterations_per_call = 16, 16, 2, 2
  c.network.policy_hidden, c.network.value_hidden = (16,), (16,)
  c.mesh.shape = (1, 1, 1)
  c.total_env_steps = total_env_steps  # one call = 2 iterations * 2 unrolls * 5 steps * 16 envs = 320 steps
  c.target_return = None
  c.env.name, c.env.episode_length = env, 50
  c.checkpoint_every_calls = 1
  c.eval_episodes = 4
  return c, mod


def test_validate_names_the_bad_key(monkeypatch):
  monkeypatch.chdir(__import__("pathlib").Path(__file__).parent.parent)
  c, mod = _tiny_config(640)
  ppo_mlp.validate(c)
  c.env.name = "not_an_env"
  with pytest.raises(ConfigError, match="env.name"):
    ppo_mlp.validate(c)
  c, _ = _tiny_config(640)
  c.ppo.num_envs = 24
  with pytest.raises(ConfigError, match="num_envs"):
    ppo_mlp.validate(c)
  with pytest.raises(ValueError, match="unknown env preset"):
    mod.get_config("walker9000")


@pytest.mark.slow
def test_train_checkpoint_load_policy_and_resume(tmp_path, monkeypatch):
  monkeypatch.chdir(__import__("pathlib").Path(__file__).parent.parent)
  c, _ = _tiny_config(640)
  out = ppo_mlp.run(c, str(tmp_path))
  assert out["calls"] == 2 and out["env_steps"] == 640
  assert (tmp_path / "report.md").exists() and (tmp_path / "metrics.jsonl").exists()

  policy = ppo_mlp.load_policy(str(tmp_path))
  assert policy.obs_dim == 4 and policy.action_dim == 2
  obs = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
  a = np.asarray(policy(obs))
  assert a.shape == (5, 2) and np.all(np.abs(a) < 1.0)
  np.testing.assert_allclose(np.asarray(policy(obs[0])), a[0], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="observations of size 4"):
    policy(np.zeros((3,)))
  sampled = np.asarray(ppo_mlp.load_policy(str(tmp_path), deterministic=False)(obs, jax.random.key(1)))
  assert sampled.shape == (5, 2) and not np.allclose(sampled, a)

  # the exported single-file policy acts exactly like the checkpoint
  from gea_jax.rl import policy_export
  path = policy_export.export_policy(str(tmp_path), tmp_path / "expert.npz")
  exported = policy_export.load_exported_policy(path)
  assert exported.meta["env_name"] == "point_mass" and exported.meta["obs_dim"] == 4
  np.testing.assert_allclose(np.asarray(jax.jit(exported)(obs)), a, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="observations of size 4"):
    exported(np.zeros((3,)))
  np.savez(tmp_path / "other.npz", x=np.zeros(3))
  with pytest.raises(ValueError, match="not a gea_jax policy file"):
    policy_export.load_exported_policy(tmp_path / "other.npz")
  with pytest.raises(FileNotFoundError, match="no policy file"):
    policy_export.load_exported_policy(tmp_path / "missing.npz")

  # resume: continues from call 2; SIGTERM arrives in call 3, which is saved, and the run stops without its final
  # evaluation or report; the rerun continues from call 3 to call 4
  c2, _ = _tiny_config(1280)
  check_finite = ppo_mlp.check_finite

  def sigterm_in_call_3(metrics, call, **kw):
    if call == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return check_finite(metrics, call, **kw)
  monkeypatch.setattr(ppo_mlp, "check_finite", sigterm_in_call_3)
  report = (tmp_path / "report.md").read_text()
  stopped = ppo_mlp.run(c2, str(tmp_path))
  assert stopped["preempted"] and stopped["calls"] == 3 and "eval/episode_return" not in stopped
  assert (tmp_path / "report.md").read_text() == report
  monkeypatch.setattr(ppo_mlp, "check_finite", check_finite)
  out2 = ppo_mlp.run(c2, str(tmp_path))
  assert out2["calls"] == 4 and out2["env_steps"] == 1280 and "preempted" not in out2
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  steps = sorted({__import__("json").loads(ln)["step"] for ln in lines})
  assert steps == [320, 640, 960, 1280]

  # exact resume: the same 4 calls without interruption give bit-identical parameters
  straight = tmp_path / "straight"
  ppo_mlp.run(_tiny_config(1280)[0], str(straight))
  a_resumed = np.asarray(ppo_mlp.load_policy(str(tmp_path))(obs))
  a_straight = np.asarray(ppo_mlp.load_policy(str(straight))(obs))
  np.testing.assert_array_equal(a_resumed, a_straight)
