"""halfcheetah expert: an MLP policy trained with the project's own PPO on Brax's halfcheetah.

There is no scripted controller for a running gait, so (as the embodiments issue asks) the expert is a
state-based MLP trained by `gea_jax.train.ppo_mlp` on `brax.envs.get_environment("halfcheetah",
backend="positional")` and exported with `gea_jax.rl.policy_export.export_policy` to the small file
`assets/halfcheetah_ppo.npz` shipped in this package (how it was trained: that file's metadata and
docs/benchmarks.md). Brax's observation is (q[1:], qd): exactly the first 17 entries of our
embodiment's state vector (the 18th is the distance to the flag, which the runner does not need: it
runs forward until it passes the flag).

Override with `experts.register_policy("halfcheetah", fn)` or point `GEA_HALFCHEETAH_POLICY` at
another exported policy file.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp

from data_pipelines.experts.base import Expert

ASSET = Path(__file__).parent / "assets" / "halfcheetah_ppo.npz"
BRAX_OBS_DIM = 17


def policy_path() -> Path:
  return Path(os.environ.get("GEA_HALFCHEETAH_POLICY", str(ASSET)))


def make_expert(name: str) -> Expert:
  from gea_jax.rl.policy_export import load_exported_policy
  path = policy_path()
  if not path.is_file():
    raise FileNotFoundError(f"{path}: the halfcheetah expert policy is missing (train one with "
                            "`python -m gea_jax.main --config=configs/ppo_mlp.py:halfcheetah,cpu --workdir=W` and "
                            "export it with `python -m gea_jax.rl.policy_export W {path}`)")
  policy = load_exported_policy(path, deterministic=True)
  if policy.meta["obs_dim"] != BRAX_OBS_DIM or policy.meta["action_dim"] != 6:
    raise ValueError(f"{path}: expected a halfcheetah policy (17 observations, 6 actions), got "
                     f"{policy.meta['obs_dim']} / {policy.meta['action_dim']} ({policy.meta['env_name']})")

  def act(state, key=None):
    ps = state.inner
    obs = jnp.concatenate([ps.q[1:], ps.qd]).astype(jnp.float32)
    return policy(obs)

  return Expert(embodiment=name, name="ppo_mlp", act=act, jittable=True)
