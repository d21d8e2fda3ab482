"""Batched expert rollouts -> RLDS-style episodes (dicts of numpy arrays), and success rates.

Episode layout (RLDS convention), for an episode with N actions (N + 1 steps):
  image [N+1, H, W, 3] uint8, state [N+1, ds] f32: observation o_0 .. o_N (o_N is the final one);
  action [N+1, da] f32 (continuous) or [N+1, 1] int32 (discrete): a_0 .. a_{N-1}, then zeros;
  reward [N+1] f32: reward[i] follows action a_i, reward[N] = 0;
  discount [N+1] f32: 1, except 0 on the last step when the episode ended by success (terminal);
  is_first [N+1]: only step 0; is_last: only step N; is_terminal: step N if the task succeeded;
  target_point [N+1, 2] f32: where the instruction's object is in each image (`Embodiment.target_point`:
  (row, col) fractions, -1 when the embodiment does not say); instruction (str), embodiment (str), task (str:
  the task family), seed (int), expert (str), success (bool).

Episode i of `rollout(name, n, seed)` resets with `jax.random.PRNGKey(seed + i)`, so every episode
is reproducible on its own, whatever the batch it ran in. Continuous-control experts run batched
under one jitted `lax.scan`; the grid planner plans on the host and its open-loop plan is replayed
the same way (the grid is deterministic).

``action_noise`` > 0: DART-style demonstrations (Laskey et al., 2017). For continuous actions the env executes the
expert's action plus Gaussian noise of that standard deviation (clipped to the action bounds); for discrete actions,
with that probability, a uniformly random one of the expert's `noise_actions`. The episode records the expert's own
(clean) action as the label: the states drift off the expert's path the way a learner's do, and each is labelled
with the expert's correction. This needs an expert that re-decides at every step: a host-side planner is replaced
by its closed-loop stand-in (`experts.get(name, closed_loop=True)`, e.g. the grid's distance field).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.experts.base import Expert, get
from gea_jax.envs import registry


def _freeze(done, new, old):
  """Keeps `old` where an episode is already done (no auto-reset: episodes stop at done)."""
  return jax.tree_util.tree_map(lambda n, o: jnp.where(done.reshape(done.shape + (1,) * (n.ndim - done.ndim)), o, n),
                                new, old)


@functools.lru_cache(maxsize=32)
def _program(env_name: str, expert: Expert, num_steps: int, planned: bool, action_noise: float = 0.0):
  """Jitted scan of ``num_steps`` expert steps from reset states ``s0`` (one program for every task split).

  Returns the final states, their target points and, per step, (obs, label action, reward, done, terminal,
  success, target point); with
  ``action_noise`` the executed action is the label plus noise (see the module docstring).
  """
  env = registry.make(env_name)
  space = env.spec.action_space
  if not space.is_continuous:
    noise_choices = jnp.asarray(expert.noise_actions if expert.noise_actions is not None else range(space.num_actions),
                                jnp.int32)

  def run(s0, keys, plans):
    def body(s, t):
      if planned:
        a = plans[:, t]
      else:
        a = jax.vmap(expert.act)(s, jax.vmap(lambda k: jax.random.fold_in(k, t))(keys))
      executed = a
      if action_noise > 0:
        noise_keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, t), 0x6e6f6973))(keys)
        if space.is_continuous:
          noise = jax.vmap(lambda k: jax.random.normal(k, a.shape[1:], a.dtype))(noise_keys)
          executed = jnp.clip(a + action_noise * noise, jnp.asarray(space.low, a.dtype),
                              jnp.asarray(space.high, a.dtype))
        else:
          explore = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 1), action_noise))(noise_keys)
          pick = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 2), (), 0, len(noise_choices)))(noise_keys)
          executed = jnp.where(explore, noise_choices[pick].astype(a.dtype), a)
      s2 = _freeze(s.done, jax.vmap(env.step)(s, executed), s)
      return s2, (s.obs, a, s2.reward, s2.done, s2.terminal, s2.success, jax.vmap(env.target_point)(s))

    s_last, traj = jax.lax.scan(body, s0, jnp.arange(num_steps))
    return s_last, jax.vmap(env.target_point)(s_last), traj

  return jax.jit(run)


def _pad_plans(plans: list, num_steps: int, filler: int) -> np.ndarray:
  out = np.full((len(plans), num_steps), filler, np.int32)
  for i, p in enumerate(plans):
    p = p if p is not None else []
    out[i, : min(len(p), num_steps)] = p[:num_steps]
  return out


@functools.lru_cache(maxsize=32)
def _batched_reset(env_name: str, task_split: str):
  """Jitted, vmapped reset of embodiment ``env_name`` (one compiled program per env, split and batch size)."""
  env = registry.make(env_name)
  return jax.jit(jax.vmap(lambda k: env.reset(k, task_split)))


def rollout(name: str, num_episodes: int, seed: int = 0, task_split: str = "train", *,
            batch_size: int = 32, expert: Expert | None = None, action_noise: float = 0.0) -> list[dict[str, Any]]:
  """Runs the expert of embodiment `name` for `num_episodes` episodes; returns RLDS-style episodes.

  Episodes run `batch_size` at a time (the last batch padded), so calls with the same batch size
  reuse one compiled program and give bit-identical episodes for the same seeds.
  action_noise: std of the Gaussian noise added to the executed (not the recorded) continuous actions; for discrete
    actions the probability of executing a random one instead (see the module docstring).
  """
  if num_episodes < 0:
    raise ValueError(f"rollout: num_episodes must be >= 0, got {num_episodes}")
  env = registry.make(name)
  action_noise = float(action_noise)
  discrete = not env.spec.action_space.is_continuous
  if action_noise < 0 or (discrete and action_noise > 1):
    expected = "in [0, 1] (a probability: discrete actions)" if discrete else ">= 0 (a std)"
    raise ValueError(f"rollout: action_noise of {name!r} must be {expected}, got {action_noise}")
  if expert is None:
    try:
      expert = get(name, closed_loop=action_noise > 0)
    except KeyError as e:  # e.g. noise for a body whose only expert is a host-side planner (grid_putnext)
      raise ValueError(f"rollout: {e.args[0]}") from None
  planned = not expert.jittable
  if planned and expert.plan is None:
    raise ValueError(f"rollout: expert {expert.name!r} of {name!r} is neither jittable nor has a plan()")
  if action_noise > 0 and planned:
    raise ValueError(f"rollout: action_noise needs an expert that re-decides every step; {expert.name!r} of {name!r} "
                     "replays a host-side plan (pass no expert to use the embodiment's closed-loop one)")
  num_steps = env.spec.max_episode_steps
  if batch_size < 1:
    raise ValueError(f"rollout: batch_size must be >= 1, got {batch_size}")
  batch = batch_size  # fixed (the last batch is padded): one compiled program per (env, batch), any split
  program = _program(name, expert, num_steps, planned, action_noise)
  family = getattr(env, "task_family", "") or name
  label = f"{expert.name}+dart{action_noise:g}" if action_noise > 0 else expert.name  # the episodes' `expert`
  reset = _batched_reset(name, task_split)
  episodes = []
  for start in range(0, num_episodes, batch):
    seeds = np.arange(start, start + batch) + seed
    n_real = min(batch, num_episodes - start)
    seeds[n_real:] = seeds[0]  # pad the last batch (same shapes, one compiled program)
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds))
    s0 = reset(keys)
    if planned:
      plans = [expert.plan(jax.tree_util.tree_map(lambda x, i=i: x[i], s0)) for i in range(batch)]
      plan_arr = jnp.asarray(_pad_plans(plans, num_steps, filler=2))
    else:
      plan_arr = jnp.zeros((batch, num_steps), jnp.int32)
    s_last, point_last, (obs, act, rew, done, term, succ, point) = program(s0, keys, plan_arr)
    instr = env.instruction(s0)
    obs, act, rew, done, term, succ, point = jax.device_get((obs, act, rew, done, term, succ, point))
    last_obs, point_last = jax.device_get((s_last.obs, point_last))
    for i in range(n_real):
      d = np.flatnonzero(done[:, i])
      n = int(d[0]) + 1 if len(d) else num_steps
      image = np.concatenate([obs["image"][:n, i], last_obs["image"][i][None]])
      state = np.concatenate([obs["state"][:n, i], last_obs["state"][i][None]]).astype(np.float32)
      target_point = np.concatenate([point[:n, i], point_last[i][None]]).astype(np.float32)
      a = np.asarray(act[:n, i])
      a = a.reshape(n, 1).astype(np.int32) if discrete else a.reshape(n, -1).astype(np.float32)
      a = np.concatenate([a, np.zeros((1, a.shape[1]), a.dtype)])
      reward = np.concatenate([rew[:n, i], [0.0]]).astype(np.float32)
      terminal = bool(term[n - 1, i])
      is_last = np.zeros(n + 1, bool)
      is_last[-1] = True
      is_first = np.zeros(n + 1, bool)
      is_first[0] = True
      discount = np.ones(n + 1, np.float32)
      if terminal:
        discount[-1] = 0.0
      episodes.append(dict(
          image=image, state=state, action=a, reward=reward, discount=discount, is_first=is_first,
          is_last=is_last, is_terminal=is_last & terminal, target_point=target_point, instruction=instr[i],
          embodiment=name, task=family, seed=int(seeds[i]), expert=label, success=bool(succ[n - 1, i])))
  return episodes


@functools.lru_cache(maxsize=32)
def _success_program(env_name: str, expert: Expert, task_split: str, num_steps: int):
  """Jitted rollout that returns only the per-episode success flags.

  Nothing reads the observations, so XLA drops the pixel rendering from the program: success rates of
  jittable experts cost the physics only (the datasets' `rollout` has to render every frame).
  """
  env = registry.make(env_name)

  def run(keys):
    s0 = jax.vmap(lambda k: env.reset(k, task_split))(keys)

    def body(carry, t):
      s, success = carry
      a = jax.vmap(expert.act)(s, jax.vmap(lambda k: jax.random.fold_in(k, t))(keys))
      s2 = _freeze(s.done, jax.vmap(env.step)(s, a), s)
      return (s2, success | (s2.success & ~s.done)), None

    (_, success), _ = jax.lax.scan(body, (s0, jnp.zeros(keys.shape[0], bool)), jnp.arange(num_steps))
    return success

  return jax.jit(run)


def success_rate(name: str, num_episodes: int, seed: int = 0, task_split: str = "train", *, batch_size: int = 32,
                 expert: Expert | None = None) -> float:
  """Fraction of successful expert episodes (episode i resets with PRNGKey(seed + i), as in `rollout`).

  Jittable experts run a success-only program without rendering; host-side planners go through `rollout`.
  """
  if num_episodes <= 0:
    return float("nan")
  expert = expert or get(name)
  if not expert.jittable:
    eps = rollout(name, num_episodes, seed, task_split, batch_size=batch_size, expert=expert)
    return float(np.mean([e["success"] for e in eps]))
  program = _success_program(name, expert, task_split, registry.make(name).spec.max_episode_steps)
  hits = []
  for start in range(0, num_episodes, batch_size):
    seeds = np.arange(start, start + batch_size) + seed
    n_real = min(batch_size, num_episodes - start)
    seeds[n_real:] = seeds[0]
    keys = jax.vmap(jax.random.PRNGKey)(jnp.asarray(seeds))
    hits.append(np.asarray(program(keys))[:n_real])
  return float(np.mean(np.concatenate(hits)))
