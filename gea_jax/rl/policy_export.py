"""A trained MLP PPO policy as one small self-describing ``.npz`` file (weights + obs statistics + network).

Orbax checkpoints carry the optimizer and the env state for an exact resume; an *expert* only needs the
policy. ``export_policy(workdir, path)`` writes the latest ``ppo_mlp`` checkpoint's actor-critic parameters,
its observation-normalization statistics and the network description to ``path``; ``load_exported_policy``
rebuilds a jittable ``fn(obs, key) -> action`` from that file alone, with nothing downloaded and no Brax
needed. The files are small enough (tens of kB) to ship inside the package as expert assets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gea_jax.rl import normalization as norm
from gea_jax.rl.networks import ActorCritic

FORMAT = "gea_jax.mlp_policy.v1"
_META_KEY = "__meta__"
_STATS_KEYS = ("count", "mean", "m2")


def _flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
  state = nnx.state(model, nnx.Param)
  out = {}
  for path, leaf in nnx.to_flat_state(state):
    out["params/" + "/".join(str(p) for p in path)] = np.asarray(leaf.get_value() if hasattr(leaf, "get_value")
                                                                 else leaf.value)
  return out


def save_policy(path: str | Path, model: ActorCritic, obs_stats: norm.RunningStats, *, env_name: str,
                obs_dim: int, action_dim: int, policy_hidden, value_hidden, activation: str,
                normalize_observations: bool, extra: dict | None = None) -> Path:
  """Writes the policy file; ``extra`` (e.g. the training return) is stored in its metadata."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  meta = {"format": FORMAT, "env_name": env_name, "obs_dim": int(obs_dim), "action_dim": int(action_dim),
          "policy_hidden": [int(h) for h in policy_hidden], "value_hidden": [int(h) for h in value_hidden],
          "activation": activation, "action_head": model.action_head,
          "normalize_observations": bool(normalize_observations), **(extra or {})}
  arrays = _flat_params(model)
  arrays.update({f"obs_stats/{k}": np.asarray(getattr(obs_stats, k)) for k in _STATS_KEYS})
  tmp = path.with_suffix(".tmp.npz")
  np.savez(tmp, **{_META_KEY: np.frombuffer(json.dumps(meta).encode(), np.uint8)}, **arrays)
  tmp.replace(path)  # never leave a half-written policy under the final name
  return path


def restore_checkpoint(workdir: str, *, step: int | None = None):
  """(ActorCritic, obs RunningStats, trainer config dict, step) of a ``ppo_mlp`` checkpoint in ``workdir``."""
  import ml_collections

  from gea_jax import checkpoint as ckpt_lib
  from gea_jax.train import ppo_mlp

  reader = ckpt_lib.Checkpointer(workdir, read_only=True)
  steps = reader.all_steps(reload=True)
  if not steps:
    raise ckpt_lib.CheckpointError(f"{Path(workdir) / 'checkpoints'}: no PPO expert checkpoint")
  step = steps[-1] if step is None else step
  meta = ckpt_lib.load_step_meta(reader.step_dir(step))
  cfg = meta.get("config") or {}
  if cfg.get("trainer") != "ppo_mlp":
    raise ckpt_lib.CheckpointError(f"{reader.step_dir(step)}: not a ppo_mlp checkpoint (trainer={cfg.get('trainer')!r})")
  network = ml_collections.ConfigDict(cfg["network"])
  env = ppo_mlp.make_env(cfg["env"]["name"], cfg["env"]["backend"])
  obs_dim, act_dim = int(env.observation_size), int(env.action_size)
  model = nnx.eval_shape(lambda: ppo_mlp.make_actor_critic(obs_dim, act_dim, network, nnx.Rngs(0)))
  graphdef, abstract = nnx.split(model, nnx.Param)
  target = {"model": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract),
            "obs_stats": jax.eval_shape(lambda: norm.init_stats(obs_dim))}
  restored = reader.restore(step, target)
  reader.close()
  return nnx.merge(graphdef, restored.params["model"]), restored.params["obs_stats"], cfg, int(step)


def export_policy(workdir: str, path: str | Path, *, step: int | None = None) -> Path:
  """The latest (or ``step``) ``ppo_mlp`` checkpoint in ``workdir`` -> a policy file at ``path``."""
  model, stats, cfg, step = restore_checkpoint(workdir, step=step)
  extra = {"source_step": step, "trained_with": {"config": cfg}}
  report = Path(workdir) / "report.json"
  if report.is_file():  # the trainer's summary (env steps, returns, wall time) documents the expert
    extra["trained_with"]["summary"] = json.loads(report.read_text()).get("summary", {})
  net = cfg["network"]
  return save_policy(path, model, stats, env_name=cfg["env"]["name"], obs_dim=model.policy.layers[0].in_features,
                     action_dim=_action_dim(model),
                     policy_hidden=net["policy_hidden"], value_hidden=net["value_hidden"], activation=net["activation"],
                     normalize_observations=bool(cfg["ppo"]["normalize_observations"]), extra=extra)


def _action_dim(model: ActorCritic) -> int:
  out = model.policy.layers[-1].out_features
  return out // 2 if model.action_head == "tanh_normal" else out


def read_policy_meta(path: str | Path) -> dict:
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no policy file")
  with np.load(path) as f:
    if _META_KEY not in f.files:
      raise ValueError(f"{path}: not a gea_jax policy file (no {_META_KEY!r} entry)")
    meta = json.loads(bytes(f[_META_KEY]).decode())
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path}: policy file format {meta.get('format')!r}, expected {FORMAT!r}")
  return meta


def load_exported_policy(path: str | Path, *, deterministic: bool = True) -> Callable:
  """``fn(obs, key) -> action`` (jittable, batched or not) from a file written by ``save_policy``."""
  path = Path(path)
  meta = read_policy_meta(path)
  model = ActorCritic(meta["obs_dim"], meta["action_dim"], action_head=meta["action_head"],
                      policy_hidden=tuple(meta["policy_hidden"]), value_hidden=tuple(meta["value_hidden"]),
                      activation=meta["activation"], rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  with np.load(path) as f:
    for key, leaf in flat.items():
      name = "params/" + "/".join(str(p) for p in key)
      if name not in f.files:
        raise ValueError(f"{path}: missing array {name!r} for a {meta['policy_hidden']} / {meta['value_hidden']} network")
      value = f[name]
      if value.shape != leaf.shape:
        raise ValueError(f"{path}: array {name!r} has shape {value.shape}, expected {leaf.shape}")
      leaf.set_value(jnp.asarray(value)) if hasattr(leaf, "set_value") else setattr(leaf, "value", jnp.asarray(value))
    missing = [f"obs_stats/{k}" for k in _STATS_KEYS if f"obs_stats/{k}" not in f.files]
    if missing:
      raise ValueError(f"{path}: missing observation statistics {missing}")
    stats = norm.RunningStats(**{k: jnp.asarray(f[f"obs_stats/{k}"]) for k in _STATS_KEYS})
  params = nnx.from_flat_state(flat)
  normalize_obs = bool(meta["normalize_observations"])
  obs_dim = int(meta["obs_dim"])

  def policy(obs, key=None):
    obs = jnp.asarray(obs, jnp.float32)
    if obs.shape[-1] != obs_dim:
      raise ValueError(f"{path}: expected observations of size {obs_dim} ({meta['env_name']}), got shape {obs.shape}")
    model = nnx.merge(graphdef, params)
    x = norm.normalize(stats, obs) if normalize_obs else obs
    dist = model.distribution(x)
    if deterministic or key is None:
      return dist.mode()
    return dist.to_action(dist.sample(key))

  policy.meta = meta
  return policy


def main(argv=None) -> None:
  """``python -m gea_jax.rl.policy_export WORKDIR OUT.npz [STEP]``."""
  import sys
  args = list(sys.argv[1:] if argv is None else argv)
  if len(args) not in (2, 3):
    raise SystemExit("usage: python -m gea_jax.rl.policy_export WORKDIR OUT.npz [STEP]")
  out = export_policy(args[0], args[1], step=int(args[2]) if len(args) == 3 else None)
  print(f"wrote {out} ({out.stat().st_size} bytes): {json.dumps(read_policy_meta(out))}")


if __name__ == "__main__":
  main()
