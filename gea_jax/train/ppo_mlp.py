"""Trainer for state-based MLP PPO experts on Brax bodies: ``run(config, workdir)``, ``validate(config)``,
``load_policy(workdir)``.

Run it as ``python -m gea_jax.main --config=configs/ppo_mlp.py:ENV --workdir=DIR``. The loop calls the jitted
``PPO.train_step`` (``ppo.iterations_per_call`` PPO iterations each), logs progress with an ETA, writes
TensorBoard/JSONL metrics, checkpoints (params + obs normalization + optimizer + env state: resume is
exact), stops at ``target_return`` if set, and writes ``report.md`` with a deterministic evaluation.

The expert's observation is the Brax env's own ``State.obs`` vector for
``brax.envs.get_environment(config.env.name, backend=config.env.backend)``; its action is the env action in
``[-1, 1]^action_size``. ``load_policy(workdir)(obs, key)`` accepts one observation or a batch.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gea_jax import checkpoint as ckpt_lib
from gea_jax import sharding as shd
from gea_jax.config_validation import ConfigError, check_mesh, check_type, get, one_of, positive, require
from gea_jax.reporting import MetricWriter, Progress, write_report
from gea_jax.rl import normalization as norm
from gea_jax.rl.brax_env import BRAX_BACKENDS, BraxVecEnv, make_brax_env
from gea_jax.rl.networks import ACTIVATIONS, ActorCritic
from gea_jax.rl.ppo import PPO, PPOConfig, episode_summary
from gea_jax.rl.toy_envs import PointMass
from gea_jax.train.loop_utils import check_finite, install_sigterm_handler

logger = logging.getLogger(__name__)

# Pure-JAX toy tasks usable in place of a Brax env (fast smoke tests of the whole trainer).
TOY_ENVS = {"point_mass": PointMass}

_PPO_KEYS = tuple(f.name for f in PPOConfig.__dataclass_fields__.values())


def ppo_config(config) -> PPOConfig:
  return PPOConfig(**{k: config.ppo[k] for k in _PPO_KEYS})


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``ConfigError`` naming the first bad key."""
  from brax import envs
  one_of(config, "trainer", ("ppo_mlp",))
  check_type(config, "seed", int)
  positive(config, "total_env_steps")
  if get(config, "target_return") is not None:
    check_type(config, "target_return", (int, float))
  one_of(config, "env.name", sorted(envs._envs) + sorted(TOY_ENVS))  # pylint: disable=protected-access
  one_of(config, "env.backend", BRAX_BACKENDS)
  positive(config, "env.episode_length")
  positive(config, "env.action_repeat")
  unknown = set(config.ppo.keys()) - set(_PPO_KEYS)
  require(not unknown, "ppo", f"unknown key(s) {sorted(unknown)}; expected {_PPO_KEYS}")
  for k in _PPO_KEYS:
    get(config, f"ppo.{k}")
  try:
    ppo_config(config).validate()
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for k in ("policy_hidden", "value_hidden"):
    hidden = tuple(get(config, f"network.{k}"))
    require(all(isinstance(h, int) and h > 0 for h in hidden), f"network.{k}", "must be positive ints", hidden)
  one_of(config, "network.activation", sorted(ACTIVATIONS))
  check_mesh(config)
  positive(config, "checkpoint_every_calls")
  positive(config, "keep_checkpoints")
  positive(config, "eval_episodes", allow_zero=True)
  try:
    shape = shd.resolve_mesh_shape(tuple(config.mesh.shape), len(_mesh_devices(config)))
  except ValueError as e:
    raise ConfigError(f"mesh.shape: {e}") from None
  data = shape[0] * shape[1]
  require(config.ppo.num_envs % data == 0, "ppo.num_envs", f"must be divisible by the {data} data-parallel devices",
          config.ppo.num_envs)


def make_env(name: str, backend: str = "positional"):
  """A Brax env by name (``backend`` applies), or one of ``TOY_ENVS``."""
  if name in TOY_ENVS:
    return TOY_ENVS[name]()
  return make_brax_env(name, backend)


def _mesh_devices(config) -> list:
  """All devices for a shape with -1; otherwise the first prod(shape) devices (e.g. (1, 1, 1) = one device)."""
  shape = tuple(config.mesh.shape)
  devices = jax.devices()
  if -1 in shape:
    return devices
  return devices[:max(1, math.prod(shape))]


def make_actor_critic(obs_dim: int, action_dim: int, network, rngs: nnx.Rngs) -> ActorCritic:
  """The expert network described by a config's ``network`` section."""
  return ActorCritic(obs_dim, action_dim, action_head="tanh_normal", policy_hidden=tuple(network.policy_hidden),
                     value_hidden=tuple(network.value_hidden), activation=network.activation, rngs=rngs)


def _model_factory(obs_dim: int, action_dim: int, network) -> Callable[[nnx.Rngs], nnx.Module]:
  return lambda rngs: make_actor_critic(obs_dim, action_dim, network, rngs)


def build(config, mesh=None) -> PPO:
  """The env and learner described by ``config`` (on ``mesh``, default: from ``config.mesh.shape``)."""
  mesh = mesh if mesh is not None else shd.make_mesh(tuple(config.mesh.shape), _mesh_devices(config))
  env = BraxVecEnv(make_env(config.env.name, config.env.backend), config.ppo.num_envs,
                   config.env.episode_length, config.env.action_repeat)
  return PPO(ppo_config(config), env, _model_factory(env.observation_size, env.action_size, config.network), mesh)


def _saved_tree(state) -> tuple[dict, dict]:
  """(params item, opt_state item) of the checkpoint; env state rides in the second for an exact resume."""
  params = {"model": state.params, "obs_stats": state.obs_stats}
  rest = {"opt": state.opt_state, "env": state.env_state, "iteration": state.iteration}
  return params, rest


def evaluate(ppo: PPO, state, episodes: int, key: jax.Array) -> dict:
  """Deterministic (mean action) episodes on a fresh batch of envs; mean return and length."""
  if episodes <= 0:
    return {}
  env = BraxVecEnv(ppo.env.env, episodes, ppo.env.episode_length, ppo.env.action_repeat)
  policy = ppo.policy_fn(state.params, state.obs_stats, deterministic=True)
  max_steps = math.ceil(ppo.env.episode_length / ppo.env.action_repeat)

  @jax.jit
  def run(key):
    k0, k1 = jax.random.split(key)
    s = env.reset(k0)

    def step(carry, k):
      s, ret, length, alive = carry
      _, action, _ = policy(s.obs, k)
      s, info = env.step(s, action)
      ret = ret + alive * info.reward
      length = length + alive * env.action_repeat
      alive = alive * (1.0 - info.done)
      return (s, ret, length, alive), None

    init = (s, jnp.zeros(episodes), jnp.zeros(episodes), jnp.ones(episodes))
    (_, ret, length, _), _ = jax.lax.scan(step, init, jax.random.split(k1, max_steps))
    return ret, length

  ret, length = run(key)
  return {"eval/episode_return": float(jnp.mean(ret)), "eval/episode_return_std": float(jnp.std(ret)),
          "eval/episode_length": float(jnp.mean(length))}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the expert in ``workdir``; returns the final summary."""
  validate(config)
  workdir = Path(workdir)
  t_start = time.time()
  ppo = build(config)
  steps_per_call = ppo.env_steps_per_iteration * ppo.config.iterations_per_call
  total_calls = max(1, math.ceil(config.total_env_steps / steps_per_call))
  state = ppo.init(jax.random.key(config.seed))

  ckpt = ckpt_lib.Checkpointer(workdir, keep=config.keep_checkpoints, save_every=config.checkpoint_every_calls,
                               config=config, async_save=False)
  start_call = 0
  params_t, rest_t = _saved_tree(state)
  restored = ckpt.restore_latest(ckpt_lib.abstract_like(params_t), ckpt_lib.abstract_like(rest_t))
  if restored is not None:
    start_call = restored.step
    state = state.replace(params=restored.params["model"], obs_stats=restored.params["obs_stats"],
                          opt_state=restored.opt_state["opt"], env_state=restored.opt_state["env"],
                          iteration=restored.opt_state["iteration"],
                          key=shd.put(restored.rng, state.key.sharding))
    logger.info("resumed %s from call %d (%d env steps)", workdir, start_call, start_call * steps_per_call)

  writer = MetricWriter(workdir, resume_step=start_call * steps_per_call if restored else None)
  stop = install_sigterm_handler()
  t_compile = time.time()
  compiled = ppo.lower(state).compile()
  compile_s = time.time() - t_compile
  logger.info("compiled the training program in %.1fs (%d env steps per call)", compile_s, steps_per_call)
  ppo._train_step = compiled  # pylint: disable=protected-access  (reuse the AOT-compiled program)

  progress = Progress(total_calls * steps_per_call, desc=f"ppo {config.env.name}", initial=start_call * steps_per_call)
  summary: dict[str, Any] = {}
  reached = None
  call = start_call
  preempted = False
  try:
    while call < total_calls:
      state, metrics = ppo.train_step(state)
      call += 1
      env_steps = call * steps_per_call
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      check_finite({"loss": metrics["loss"]}, call, checkpointer=ckpt)
      ep = episode_summary(metrics)
      scalars = {f"train/{k}": v for k, v in metrics.items() if k not in ("episode_return_sum",
                                                                         "episode_length_sum")}
      if ep["episodes"]:
        scalars.update({"episode/return": ep["episode_return"], "episode/length": ep["episode_length"]})
      scalars["time/wall_s"] = time.time() - t_start
      writer.scalars(env_steps, scalars)
      progress.update(steps_per_call, ret=ep["episode_return"], loss=metrics["loss"])
      done = config.target_return is not None and ep["episodes"] > 0 and ep["episode_return"] >= config.target_return
      if done and reached is None:
        reached = env_steps
      params_t, rest_t = _saved_tree(state)
      preempted = stop.stop_at(call)
      ckpt.save(call, params=params_t, opt_state=rest_t, rng=state.key, force=preempted or done or
                call == total_calls, extra={"loss": metrics["loss"], "env_steps": env_steps,
                                            "episode_return": ep["episode_return"]})
      if preempted or done:
        break
  finally:
    progress.close()
    stop.uninstall()
    ckpt.wait()
    writer.flush()

  if preempted:  # no final evaluation or report: the run is not finished, rerunning the command resumes it
    writer.close()
    ckpt.close()
    logger.warning("ppo_mlp: SIGTERM received; checkpoint saved at call %d (%d env steps), exiting", call,
                   call * steps_per_call)
    return {"env": config.env.name, "env_steps": call * steps_per_call, "calls": call, "preempted": True}

  eval_metrics = evaluate(ppo, state, int(config.eval_episodes), jax.random.key(config.seed + 1))
  summary = {"env": config.env.name, "env_steps": call * steps_per_call, "calls": call,
             "target_return": config.target_return, "reached_target_at_env_steps": reached,
             "compile_s": round(compile_s, 2), "wall_s": round(time.time() - t_start, 1), **eval_metrics}
  writer.scalars(call * steps_per_call, {k: v for k, v in eval_metrics.items()})
  writer.close()
  write_report(workdir, f"PPO MLP expert: {config.env.name}", summary=summary, curves={
      k: v for k, v in writer.curves().items() if k in ("episode/return", "train/loss", "train/entropy")})
  ckpt.close()
  logger.info("ppo_mlp done: %s", summary)
  return summary


def load_policy(workdir: str, *, deterministic: bool = True, step: int | None = None) -> Callable:
  """``fn(obs, key) -> action`` from the checkpoint in ``workdir`` (config and normalization included).

  ``obs`` is the Brax env's ``State.obs`` (shape ``[obs_dim]`` or ``[B, obs_dim]``), the action is in
  ``[-1, 1]``. ``deterministic`` uses the mean action (tanh of the Gaussian mean); otherwise it samples.
  """
  from gea_jax.rl.policy_export import restore_checkpoint
  model, stats, cfg, _ = restore_checkpoint(workdir, step=step)
  graphdef, params = nnx.split(model, nnx.Param)
  obs_dim = int(model.policy.layers[0].in_features)
  act_dim = int(model.policy.layers[-1].out_features) // 2
  normalize_obs = bool(cfg["ppo"]["normalize_observations"])

  @jax.jit
  def act(obs, key):
    model = nnx.merge(graphdef, params)
    x = norm.normalize(stats, obs) if normalize_obs else obs
    dist = model.distribution(x)
    return dist.mode() if deterministic else dist.to_action(dist.sample(key))

  def policy(obs, key=None):
    obs = jnp.asarray(obs, jnp.float32)
    if obs.shape[-1] != obs_dim:
      raise ValueError(f"load_policy({workdir}): expected observations of size {obs_dim} "
                       f"({cfg['env']['name']} State.obs), got shape {obs.shape}")
    return act(obs, jax.random.key(0) if key is None else key)

  policy.obs_dim, policy.action_dim, policy.env_name = obs_dim, act_dim, cfg["env"]["name"]
  return policy
