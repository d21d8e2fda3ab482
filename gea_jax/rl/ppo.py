"""PPO: one jitted training call = ``iterations_per_call`` x (rollout -> GAE -> epochs of minibatch SGD).

Pieces, each usable on its own (the VLM agent's PPO reuses ``sgd_epochs`` and the losses with its own policy):

- ``sgd_epochs(loss_fn, ...)``: several epochs of shuffled minibatch updates over a batch-major data tree.
- ``PPO``: the state-based learner for a ``BraxVecEnv``-like env and an NNX module ``model(obs) -> (dist,
  value)``; ``PPO.init(key) -> PPOState`` and ``PPO.train_step(state) -> (state, metrics)``.

Sharding: env-batched arrays are split over the mesh axes the "envs" rule names (("data", "fsdp") by
default); parameters, optimizer state and normalization statistics are replicated. The whole step is one
``jax.jit`` with global semantics, so gradients and statistics are global means (XLA inserts the
all-reduces) and a run on an N-device mesh computes the same numbers as on one device. Minibatches are drawn
by shuffling within ``shuffle_blocks`` contiguous blocks of the batch (one block per data shard when
``shuffle_blocks`` equals the data-parallel size), so shuffling never moves data between devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gea_jax import sharding as shd
from gea_jax.rl import normalization as norm
from gea_jax.rl.gae import compute_gae
from gea_jax.rl.losses import ppo_loss
from gea_jax.rl.rollout import rollout


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Hyperparameters (names and semantics follow Brax's ``ppo.train`` where they overlap).

  Each iteration collects ``batch_size * num_minibatches`` trajectories of ``unroll_length`` steps:
  ``num_envs`` envs run ``batch_size * num_minibatches / num_envs`` consecutive unrolls.
  """

  num_envs: int = 256
  unroll_length: int = 5
  batch_size: int = 256
  num_minibatches: int = 8
  num_epochs: int = 4  # Brax: num_updates_per_batch
  learning_rate: float = 3e-4
  entropy_coef: float = 1e-2
  discount: float = 0.97
  gae_lambda: float = 0.95
  clip_eps: float = 0.3
  value_clip_eps: float | None = None
  vf_coef: float = 0.5
  reward_scaling: float = 10.0
  normalize_advantage: bool = True
  normalize_observations: bool = True
  max_grad_norm: float | None = None
  iterations_per_call: int = 1
  shuffle_blocks: int = 1

  @property
  def trajectories_per_iteration(self) -> int:
    return self.batch_size * self.num_minibatches

  @property
  def unrolls_per_iteration(self) -> int:
    return self.trajectories_per_iteration // self.num_envs

  def validate(self) -> None:
    positive = ("num_envs", "unroll_length", "batch_size", "num_minibatches", "num_epochs",
                "iterations_per_call", "shuffle_blocks")
    for name in positive:
      if int(getattr(self, name)) < 1:
        raise ValueError(f"ppo.{name}: must be >= 1, got {getattr(self, name)}")
    if self.trajectories_per_iteration % self.num_envs:
      raise ValueError(f"ppo.batch_size * ppo.num_minibatches ({self.trajectories_per_iteration}) must be a "
                       f"multiple of ppo.num_envs ({self.num_envs})")
    if self.num_envs % self.shuffle_blocks:
      raise ValueError(f"ppo.num_envs ({self.num_envs}) must be divisible by ppo.shuffle_blocks "
                       f"({self.shuffle_blocks})")
    if (self.trajectories_per_iteration // self.shuffle_blocks) % self.num_minibatches:
      raise ValueError(f"ppo.batch_size ({self.batch_size}) must be divisible by ppo.shuffle_blocks "
                       f"({self.shuffle_blocks})")
    for name in ("learning_rate", "clip_eps", "reward_scaling"):
      if not float(getattr(self, name)) > 0:
        raise ValueError(f"ppo.{name}: must be > 0, got {getattr(self, name)}")
    for name in ("discount", "gae_lambda"):
      if not 0.0 <= float(getattr(self, name)) <= 1.0:
        raise ValueError(f"ppo.{name}: must be in [0, 1], got {getattr(self, name)}")


def sgd_epochs(loss_fn: Callable, optimizer: optax.GradientTransformation, params: Any, opt_state: Any,
               data: Any, key: jax.Array, *, num_epochs: int, num_minibatches: int,
               shuffle_blocks: int = 1, per_step: Any = None) -> tuple[Any, Any, dict]:
  """``num_epochs`` passes of ``num_minibatches`` updates over ``data`` (leaves ``[N, ...]``).

  ``loss_fn(params, minibatch, key) -> (loss, metrics)``. Each epoch shuffles samples within each of
  ``shuffle_blocks`` contiguous blocks; minibatch ``m`` takes the ``m``-th slice of every block.
  ``per_step``: None, or a tree with leaves ``[num_epochs, num_minibatches, ...]`` that is not shuffled: step
  ``(e, m)`` passes its slice as a fourth argument, ``loss_fn(params, minibatch, key, step_data)`` (e.g. a fresh
  batch of other data for each step).
  Returns updated ``(params, opt_state, mean metrics)``.
  """
  n = jax.tree.leaves(data)[0].shape[0]
  per_block = n // shuffle_blocks
  per_mb = per_block // num_minibatches
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def to_minibatches(x, perms):
    x = x.reshape((shuffle_blocks, per_block) + x.shape[1:])
    x = jax.vmap(lambda xb, p: xb[p])(x, perms)
    x = x.reshape((shuffle_blocks, num_minibatches, per_mb) + x.shape[2:])
    x = jnp.swapaxes(x, 0, 1)
    return x.reshape((num_minibatches, shuffle_blocks * per_mb) + x.shape[3:])

  if per_step is not None:
    for x in jax.tree.leaves(per_step):
      if x.shape[:2] != (num_epochs, num_minibatches):
        raise ValueError(f"sgd_epochs: per_step leaves must start with (num_epochs, num_minibatches) = "
                         f"({num_epochs}, {num_minibatches}), got shape {x.shape}")

  def minibatch_step(carry, xs):
    params, opt_state = carry
    mb, k, extra = xs
    args = (params, mb, k) if per_step is None else (params, mb, k, extra)
    (_, metrics), grads = grad_fn(*args)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return (params, opt_state), metrics

  def epoch(carry, xs):
    k, extra = xs
    k_perm, k_loss = jax.random.split(k)
    perms = jax.vmap(lambda kk: jax.random.permutation(kk, per_block))(jax.random.split(k_perm, shuffle_blocks))
    mbs = jax.tree.map(lambda x: to_minibatches(x, perms), data)
    return jax.lax.scan(minibatch_step, carry, (mbs, jax.random.split(k_loss, num_minibatches), extra))

  (params, opt_state), metrics = jax.lax.scan(epoch, (params, opt_state),
                                              (jax.random.split(key, num_epochs), per_step))
  return params, opt_state, jax.tree.map(jnp.mean, metrics)


@struct.dataclass
class PPOState:
  params: Any  # nnx.State of the policy/value module's Params
  opt_state: Any
  obs_stats: norm.RunningStats
  env_state: Any
  key: jax.Array
  iteration: jax.Array  # int32 scalar: PPO iterations done


def make_optimizer(config: PPOConfig) -> optax.GradientTransformation:
  adam = optax.adam(config.learning_rate)
  if config.max_grad_norm is None:
    return adam
  return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adam)


class PPO:
  """PPO learner for a vectorized env (``reset_batch/from_reset/step`` like ``BraxVecEnv``) and an NNX module."""

  def __init__(self, config: PPOConfig, env, model_factory: Callable[[nnx.Rngs], nnx.Module],
               mesh: Mesh | None = None, rules=shd.DEFAULT_RULES):
    config.validate()
    if env.num_envs != config.num_envs:
      raise ValueError(f"env has {env.num_envs} envs but ppo.num_envs is {config.num_envs}")
    self.config = config
    self.env = env
    self.model_factory = model_factory
    self.mesh = mesh if mesh is not None else shd.make_mesh((1, 1, 1), jax.devices()[:1])
    self.rules = rules
    self.optimizer = make_optimizer(config)
    self.graphdef, _ = nnx.split(nnx.eval_shape(lambda: model_factory(nnx.Rngs(0))), nnx.Param)
    env_spec = shd.logical_to_spec(("envs",), rules)
    self._env_axes = env_spec[0]
    shards = 1 if self._env_axes is None else self.mesh.shape[self._env_axes] if isinstance(
        self._env_axes, str) else int(jnp.prod(jnp.array([self.mesh.shape[a] for a in self._env_axes])))
    if config.num_envs % shards:
      raise ValueError(f"ppo.num_envs ({config.num_envs}) must be divisible by the {shards} devices of the "
                       f"mesh axes {self._env_axes} that envs are split over")
    self._train_step = None
    self._reset_fn = None

  @property
  def env_steps_per_iteration(self) -> int:
    c = self.config
    return c.num_envs * c.unrolls_per_iteration * c.unroll_length * getattr(self.env, "action_repeat", 1)

  # --- placement ---------------------------------------------------------------------------------------

  def _env_sharding(self, x) -> NamedSharding:
    spec = PartitionSpec(self._env_axes, *([None] * (x.ndim - 1))) if x.ndim else PartitionSpec()
    return NamedSharding(self.mesh, spec)

  def _replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def state_shardings(self, state: PPOState) -> PPOState:
    rep = self._replicated()
    env_sh = jax.tree.map(self._env_sharding, state.env_state)
    return PPOState(params=jax.tree.map(lambda _: rep, state.params),
                    opt_state=jax.tree.map(lambda _: rep, state.opt_state),
                    obs_stats=jax.tree.map(lambda _: rep, state.obs_stats), env_state=env_sh,
                    key=rep, iteration=rep)

  def _constrain_envs(self, tree, axis: int = 0):
    def c(x):
      spec = [None] * x.ndim
      spec[axis] = self._env_axes
      return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, PartitionSpec(*spec)))
    return jax.tree.map(c, tree)

  # --- init --------------------------------------------------------------------------------------------

  def _reset_batch(self, key: jax.Array):
    """Fresh initial states for all envs: one jitted program, shared by ``init`` and ``refresh``."""
    if self._reset_fn is None:
      sh = NamedSharding(self.mesh, PartitionSpec(self._env_axes))
      self._reset_fn = jax.jit(self.env.reset_batch, in_shardings=self._replicated(), out_shardings=sh)
    return self._reset_fn(shd.put(key, self._replicated()))

  def init(self, key: jax.Array) -> PPOState:
    k_model, k_env, k_cache, k_state = jax.random.split(key, 4)
    env_state = self.env.from_reset(self._reset_batch(k_env), self._reset_batch(k_cache))

    def make():
      model = self.model_factory(nnx.Rngs(k_model))
      params = nnx.state(model, nnx.Param)
      return PPOState(params=params, opt_state=self.optimizer.init(params),
                      obs_stats=norm.init_stats(self.env.observation_size), env_state=None, key=k_state,
                      iteration=jnp.zeros((), jnp.int32))

    rep = self._replicated()
    state = jax.jit(make, out_shardings=rep)()
    return self.place(state.replace(env_state=env_state))

  def refresh_resets(self, state: PPOState) -> PPOState:
    """New random initial states for the auto-resets of the next ``train_step`` (outside the big program)."""
    cache = self._reset_batch(jax.random.fold_in(state.key, 0x5E5E7))
    return state.replace(env_state=state.env_state.replace(reset_cache=cache))

  def place(self, state: PPOState) -> PPOState:
    """Put a host/restored state onto this learner's mesh."""
    return shd.put(state, self.state_shardings(state))

  # --- acting ------------------------------------------------------------------------------------------

  def model(self, params) -> nnx.Module:
    return nnx.merge(self.graphdef, params)

  def _obs(self, stats, obs):
    return norm.normalize(stats, obs) if self.config.normalize_observations else obs

  def policy_fn(self, params, stats, deterministic: bool = False) -> Callable:
    """``(obs, key) -> (raw_action, env_action, {"log_prob", "value"})`` for ``rollout``."""
    model = self.model(params)

    def fn(obs, key):
      dist, value = model(self._obs(stats, obs))
      raw = dist.sample(key) if not deterministic else dist.loc if hasattr(dist, "loc") else dist.mode()
      return raw, dist.to_action(raw), {"log_prob": dist.log_prob(raw), "value": value}
    return fn

  # --- learning ----------------------------------------------------------------------------------------

  def _loss(self, stats, params, mb, key):
    c = self.config
    dist, value = self.model(params)(self._obs(stats, mb["obs"]))
    return ppo_loss(dist.log_prob(mb["action"]), mb["log_prob"], mb["advantage"], value, mb["value"],
                    mb["target"], dist.entropy(key), clip_eps=c.clip_eps, value_clip_eps=c.value_clip_eps,
                    vf_coef=c.vf_coef, entropy_coef=c.entropy_coef, normalize_advantage=c.normalize_advantage)

  def _iteration(self, state: PPOState, _):
    c = self.config
    key, k_roll, k_sgd = jax.random.split(state.key, 3)
    env_state = state.env_state
    length = c.unrolls_per_iteration * c.unroll_length
    env_state, traj = rollout(self.env.step, self.policy_fn(state.params, state.obs_stats), env_state, k_roll,
                              length)
    env_state = self._constrain_envs(env_state)
    _, bootstrap = self.model(state.params)(self._obs(state.obs_stats, env_state.obs))
    info = traj.info
    adv, target = compute_gae(info.reward * c.reward_scaling, traj.extras["value"], bootstrap, info.termination,
                              info.truncation, c.discount, c.gae_lambda)
    stats = norm.update_stats(state.obs_stats, traj.obs) if c.normalize_observations else state.obs_stats

    # [L, E, ...] -> [E * R, T, ...]: trajectories of unroll_length, env-major so the env sharding carries over.
    def to_batch(x):
      x = x.reshape((c.unrolls_per_iteration, c.unroll_length) + x.shape[1:])
      x = jnp.moveaxis(x, 2, 0)
      return x.reshape((-1, c.unroll_length) + x.shape[3:])

    data = {"obs": traj.obs, "action": traj.action, "log_prob": traj.extras["log_prob"],
            "value": traj.extras["value"], "advantage": adv, "target": target}
    data = self._constrain_envs(jax.tree.map(to_batch, data))
    params, opt_state, metrics = sgd_epochs(
        lambda p, mb, k: self._loss(stats, p, mb, k), self.optimizer, state.params, state.opt_state, data, k_sgd,
        num_epochs=c.num_epochs, num_minibatches=c.num_minibatches, shuffle_blocks=c.shuffle_blocks)
    done = info.done
    metrics["episodes"] = jnp.sum(done)
    metrics["episode_return_sum"] = jnp.sum(done * info.episode_return)
    metrics["episode_length_sum"] = jnp.sum(done * info.episode_length)
    metrics["reward_mean"] = jnp.mean(info.reward)
    new = PPOState(params=params, opt_state=opt_state, obs_stats=stats, env_state=env_state, key=key,
                   iteration=state.iteration + 1)
    return new, metrics

  def _train_chunk(self, state: PPOState):
    state, metrics = jax.lax.scan(self._iteration, state, None, length=self.config.iterations_per_call)
    sums = {k: jnp.sum(metrics[k]) for k in ("episodes", "episode_return_sum", "episode_length_sum")}
    out = {k: jnp.mean(v) for k, v in metrics.items() if k not in sums}
    out.update(sums)
    return state, out

  def _jitted_chunk(self, state: PPOState):
    if self._train_step is None:
      shardings = self.state_shardings(state)
      self._train_step = jax.jit(self._train_chunk, in_shardings=(shardings,),
                                 out_shardings=(shardings, self._replicated()), donate_argnums=0)
    return self._train_step

  def train_step(self, state: PPOState) -> tuple[PPOState, dict]:
    """Refresh the reset cache, then ``iterations_per_call`` PPO iterations in one jitted call.

    The input state is donated: use the returned one.
    """
    state = self.refresh_resets(state)
    return self._jitted_chunk(state)(state)

  def lower(self, state: PPOState):
    """The lowered training program (``.compile()`` it to time compilation separately)."""
    return self._jitted_chunk(state).lower(state)


def episode_summary(metrics: dict) -> dict:
  """Mean return/length of the episodes completed during a ``train_step`` (NaN when none finished)."""
  n = float(metrics["episodes"])
  if n == 0:
    return {"episode_return": float("nan"), "episode_length": float("nan"), "episodes": 0}
  return {"episode_return": float(metrics["episode_return_sum"]) / n,
          "episode_length": float(metrics["episode_length_sum"]) / n, "episodes": int(n)}
