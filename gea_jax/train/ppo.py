"""Stage 2: online PPO of the VLM agent in the embodiments' JAX environments.

``python -m gea_jax.main --config=configs/ppo.py --workdir=DIR`` (``ppo.sft_workdir`` names the SFT run to
start from), or ``train(config, workdir, model, ctx, embodiments)`` after SFT in the end-to-end pipeline.

One iteration: for every embodiment, ``ppo.num_envs`` envs run ``ppo.unroll_length`` steps
(`gea_jax.agent.rollout`: the prompt is built on device, the action tokens are sampled one by one with the
KV cache and constrained to the embodiment's ids; the action's log-prob is the sum over its tokens, the value
head reads the prompt's last hidden state; episodes auto-reset). GAE per embodiment (`gea_jax.rl.gae`; an episode
that hit its time limit is cut there, or with ``ppo.time_limit = "terminal"`` ends with no further reward), with
advantages normalized per embodiment, then ``ppo.num_epochs`` epochs of minibatches
(`gea_jax.rl.ppo.sgd_epochs`) whose loss re-scores the stored full sequences (prompt + sampled ids) in one
teacher-forced pass (`action_scores`): clipped surrogate, value loss (clipped if ``ppo.value_clip_eps``),
entropy bonus, optionally a KL penalty to the frozen starting (SFT) policy and, with ``ppo.sft_coef``, the SFT
cross-entropy on a batch of expert data (GEA's joint SFT + RL). The first ``ppo.value_warmup_iterations``
iterations train the value head alone (its gradient stopped at the trunk, every other term off). What trains is
``ppo.train_mode`` (or ``model.train_mode`` when empty): "lora" (LoRA + value head + non-LLM parts + the
embedding table; GEA), "lora_fixed_embeddings" (the same but the embedding table, also the agent's tied output
head: its PPO gradient measured as noise on reacher but as signal on the grid, docs/benchmarks.md, sessions
22-23), "lora_value" (LoRA + value head only), "frozen" (LLM frozen, adapters = vision/projector/state/value;
LLaRP) or "full". After the warm-up the value loss's gradient reaches the shared trunk scaled by
``ppo.value_trunk_grad`` (1: fully; 0, the default: the value head learns on the policy's features alone).
With ``ppo.critic = "privileged"`` the baseline is instead an MLP on each body's simulator state and task
(`gea_jax.rl.privileged_critic`, an asymmetric actor-critic: the collector records its features), fitted after the
policy's epochs; the agent's value head is then not trained, and the critic is part of the checkpoint.
The collector and the update are each one jitted call over the split (trainable, frozen) model state.
Besides the loss terms, an update reports per embodiment ``<name>/entropy`` (the trained policy's, summed over the
action's tokens, on its rows of the batch), ``<name>/kl_to_sft`` and, with the KL penalty on, ``<name>/ref_entropy``
(the frozen SFT policy's entropy on the same rows: what the trained policy's is to be compared with, since continued
episodes change the states a batch holds over a run).

Sharding: the run lives on the config's mesh (``mesh.shape``, ``sharding.rules``; ``train(..., mesh=)`` overrides
it), like SFT's. The model's variables (trainable and frozen), the frozen reference policy and the optimizer
state are placed by their logical axes (`sharding.shard_module`; Adam's moments like their parameters). Each
embodiment's ``ppo.num_envs`` envs are split over the "envs" rule's mesh axes (("data", "fsdp") by default): the
reset pool, the scan's carry and the trajectory are sharded on their env axis, so each device steps, renders
and decodes its own envs. The update's transitions are laid out env-major (``[N, embodiments, T]``, so each
device keeps its envs' rows) and sharded over the "batch" axes; minibatches are drawn by one global shuffle
(XLA moves the rows) and pinned to the batch axes. Every jitted call has fixed output shardings and compiles
once. Sampling draws one key per env step for all envs; jax's partitionable threefry makes the draws
independent of the sharding, so an iteration on 8 devices samples the same actions as on one and updates the
parameters to within float rounding (tests/test_vlm_ppo.py). ``ppo.num_envs``, the minibatch (transitions /
``ppo.num_minibatches``) and ``ppo.sft_batch_size`` must be divisible by the data*fsdp size (`validate_mesh`).

Episodes continue across iterations (``ppo.continue_episodes``, default on, as in Brax's PPO): each iteration's
collector starts from the episodes the previous one left running (the first from a reset pool), so an episode
longer than ``ppo.unroll_length`` steps is played to its end over several iterations; otherwise PPO would only ever
see every episode's first ``unroll_length`` steps (reacher's episodes run up to 100 steps, the agent's failures are
in their second half). Envs that finish reset from a pool drawn from ``fold_in(seed, iteration)``. A checkpoint
(trainable params, optimizer state, iteration, the running episodes, and the expert iterator's state when
``ppo.sft_coef > 0``) resumes bit-exactly. With ``continue_episodes=False`` every iteration starts from freshly
reset envs (the behaviour before session 6).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gea_jax import config_validation as cv
from gea_jax import sharding
from gea_jax.agent.context import AgentContext
from gea_jax.agent.model import AgentModel, trainable_filter
from gea_jax.agent.policy import action_scores, candidate_ids, sft_loss
from gea_jax.agent.rollout import initial_episodes, make_collector, make_reset_pool, sequences
from gea_jax.agent.sequence import fill_action_ids
from gea_jax.checkpoint import Checkpointer, abstract_like
from gea_jax.models.tiny_cnn import use_loop_gradients
from gea_jax.reporting import MetricWriter, Progress
from gea_jax.rl.gae import compute_gae
from gea_jax.rl.losses import normalize_advantages, ppo_loss
from gea_jax.rl.ppo import sgd_epochs
from gea_jax.rl.privileged_critic import PrivilegedCritic, critic_inputs, feature_dim, privileged_features
from gea_jax.train.loop_utils import check_finite, install_sigterm_handler


def ppo_defaults() -> ml_collections.ConfigDict:
  """The ``ppo`` config section (tiny CPU defaults)."""
  c = ml_collections.ConfigDict()
  c.iterations = 4
  c.embodiments = ""            # "" = data.embodiments
  c.num_envs = 8                # per embodiment
  c.unroll_length = 16          # env steps per env per iteration
  c.continue_episodes = True    # episodes run on across iterations (False: every iteration starts from resets)
  c.reset_pool = 4              # pool of num_envs * (1 + reset_pool) reset states for auto-reset
  c.task_split = "train"
  c.num_epochs = 2
  c.num_minibatches = 4
  # > 1: gradients of this many consecutive minibatches are averaged into one Adam step (optax.MultiSteps): an
  # update sees num_envs x unroll_length x bodies / num_minibatches x grad_accum transitions at one minibatch's
  # memory. Must divide num_minibatches (no accumulation runs across iterations, whose policies differ)
  c.grad_accum = 1
  c.lr = 1e-4
  # the learning rate over the run's Adam steps: "constant", or decayed to 0 at ppo.iterations ("linear", "cosine"; as
  # SFT's schedule ends). At a constant 1e-3 reacher's held-out success moved 5-13 points between checkpoints two
  # iterations apart (docs/benchmarks.md, session 20), so the final checkpoint is one draw of a jittering policy;
  # with "linear" the last three checkpoints (4 iterations) of two seeds stayed within ~4 points (session 21)
  c.lr_decay = "constant"
  c.value_lr = 0.0              # > 0: the value head's own Adam learning rate (0 = lr)
  # the baseline GAE uses: "policy" (the agent's value head on the LLM's last hidden state; GEA) or "privileged" (an
  # MLP on the simulator's state and task, `gea_jax.rl.privileged_critic`: asymmetric actor-critic; the agent's value
  # head is then not trained). The privileged critic has its own Adam at critic_lr and hidden layers critic_hidden; it
  # starts from scratch, so each update fits it for critic_epochs passes over the batch (num_minibatches steps each)
  c.critic = "policy"
  c.critic_lr = 1e-3
  c.critic_hidden = (256, 256)
  c.critic_epochs = 8
  c.grad_clip = 1.0
  c.discount = 0.97
  # 0 (one-step advantages r + V(s') - V(s)) with the privileged critic: independent batches' gradients agree 4-6x
  # better than at 0.95, but grid-only and reacher-only runs with it trained worse (docs/benchmarks.md, session 24)
  c.gae_lambda = 0.95
  c.clip_eps = 0.2
  # 0 = unclipped value loss: returns differ in scale across bodies (reacher about -3, grid 0..1) and the value
  # head starts untrained, so a clip of 0.2 per iteration would hold the value back for many iterations
  c.value_clip_eps = 0.0
  c.vf_coef = 0.5
  c.entropy_coef = 0.01
  # > 0: penalty KL(pi || frozen SFT policy) on the sampled actions. 0.2 (0.05 until session 13): at 0.05 the policy
  # walked 0.4-0.6 nats per action away from SFT in 120 iterations without its reward moving (docs/benchmarks.md)
  c.kl_coef = 0.2
  c.reward_scaling = 1.0
  # potential-based reward shaping, "name=coef,..." (bodies with a shaping_potential: the go-to / pick-up grid
  # bodies): r + coef * (discount * phi(s') - phi(s)), phi = minus the actions left to the target
  # (gea_jax.rl.shaping; the optimal policies are unchanged, a sparse-reward body gets a signal on every step)
  c.shaping = ""
  # how GAE treats an episode that hit its time limit: "cut" (no TD error at that step, the advantage chain stops: it
  # carries no signal) or "terminal" (it ended with no further reward, as the evaluation scores it: an episode that
  # never reached its goal, e.g. a grid agent stuck walking into an object, gets a negative signal at its end)
  c.time_limit = "cut"
  c.normalize_advantage = True  # per embodiment over its whole batch (reward scales differ across bodies)
  # an embodiment whose batch holds one reward value only (a sparse-reward body with no success this iteration) gets
  # zero advantages: its GAE estimates are then value-function error alone, which normalization would blow up to
  # unit scale and follow as if it were signal (no measurable effect on sft_vs_ppo at 40 iterations: docs/benchmarks.md)
  c.skip_flat_reward = True
  # GEA's joint SFT + RL: > 0 adds sft_coef x the SFT cross-entropy on a batch of expert data to every update
  # (keeps what SFT learned where PPO's batches are small or its reward says little). Batch size 128 (16 until
  # session 19): at lr 1e-3 one 16-sequence batch per iteration raised the SFT loss it was meant to hold (0.9 -> 1.4
  # in 25 iterations, reacher 89% -> 77%), 128 held it (docs/benchmarks.md, session 19)
  c.sft_coef = 0.0
  c.sft_batch_size = 128
  # True: a fresh expert batch for each Adam step of the update (num_epochs x num_minibatches batches per
  # iteration; fetching them costs ~0.3 s per iteration at 8 x 128 sequences); False: one batch per iteration,
  # reused by all of its steps (sessions 18-19's runs)
  c.sft_batch_per_step = True
  # the bodies whose expert data makes that batch, "a,b" ("" = every body the agent knows, not only those PPO acts in)
  c.sft_embodiments = ""
  c.value_warmup_iterations = 2 # first iterations train the value head alone (the policy is left unchanged)
  # after the warm-up: scale of the value loss's gradient into the shared trunk (LoRA, vision, projector); 0 = the
  # value head trains alone on the policy's features. 0 (1 until session 13): fitting reacher's value reshaped the
  # hidden state that also predicts the first action token, making the policy more random than SFT on the same states
  c.value_trunk_grad = 0.0
  c.temperature = 1.0
  # rollouts decode with the LoRA adapters folded into a copy of the kernels, once per collector call (faster
  # action-token steps; needs memory for a second copy of the adapted kernels: False on a model that cannot spare it)
  c.fold_lora = True
  # GEA: LoRA + value head; "" = model.train_mode; "lora" (also the vision encoder, projector, state encoder and
  # embedding table) | "lora_fixed_embeddings" ("lora" but the embedding table stays as SFT left it) | "lora_value"
  # (LoRA + value head only) | "frozen" | "full"
  c.train_mode = "lora"
  c.log_every = 1
  c.checkpoint_every = 2
  c.keep_checkpoints = 2
  c.sft_workdir = ""            # run(): start from this SFT run's latest checkpoint
  return c


CRITICS = ("policy", "privileged")
LORA_TRAIN_MODES = ("lora", "lora_fixed_embeddings", "lora_value")  # ppo.train_mode values that need LoRA adapters
TRAIN_MODES = LORA_TRAIN_MODES + ("frozen", "full")


def critic_kind(p) -> str:
  """``ppo.critic`` ("policy" when absent), checked (a learner can be built without `validate`)."""
  kind = p.get("critic", "policy")
  cv.require(kind in CRITICS, "ppo.critic", f"must be one of {CRITICS}", kind)
  return kind


def critic_hidden(p) -> tuple[int, ...]:
  """``ppo.critic_hidden``, checked: the privileged critic MLP's hidden widths."""
  hidden = tuple(p.get("critic_hidden", (256, 256)))
  cv.require(len(hidden) > 0 and all(isinstance(h, int) and h > 0 for h in hidden), "ppo.critic_hidden",
             "must be a non-empty tuple of positive ints (the privileged critic's hidden widths)", hidden)
  return hidden


def critic_fit_settings(p) -> tuple[float, int]:
  """``ppo.critic_lr`` and ``ppo.critic_epochs`` of the privileged critic (defaults when absent), checked: a learner
  can be built without `validate`, and 0 epochs would leave its metrics NaN."""
  lr, epochs = p.get("critic_lr", 1e-3), p.get("critic_epochs", 8)
  cv.require(isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0,
             "ppo.critic_lr", "must be a finite number > 0 (the privileged critic's Adam learning rate)", lr)
  cv.require(isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0, "ppo.critic_epochs",
             "must be an int > 0 (passes of the privileged critic's fit over each update's batch)", epochs)
  return float(lr), epochs


def embodiment_advantages(p, reward, value, bootstrap, termination, truncation):
  """GAE advantages (normalized per ``p.normalize_advantage``) and value targets of one embodiment's batch [T, N].

  With ``p.skip_flat_reward`` a batch whose rewards are all equal gets zero advantages (no policy signal; the
  value targets are kept, so the value head still learns).
  """
  if str(p.get("time_limit", "cut")) == "terminal":  # the time limit ends the task: no future reward after it
    termination, truncation = termination | truncation, jnp.zeros_like(truncation)
  adv, target = compute_gae(reward * float(p.reward_scaling), value, bootstrap, termination, truncation,
                            float(p.discount), float(p.gae_lambda))
  if bool(p.normalize_advantage):
    adv = normalize_advantages(adv)
  if bool(p.get("skip_flat_reward", False)):
    flat = jnp.all(reward == reward.reshape(-1)[0])
    adv = jnp.where(flat, jnp.zeros_like(adv), adv)
  return adv, target


def shaping_coefs(p) -> dict[str, float]:
  """The ``ppo`` section's ``shaping`` -> {embodiment: coefficient}; every named body must define a shaping
  potential (a ConfigError naming ``ppo.shaping`` otherwise)."""
  from gea_jax.envs import registry
  from gea_jax.rl.shaping import has_potential
  coefs = cv.per_embodiment({"ppo": p}, "ppo.shaping", float, "coefficient")
  for name, coef in coefs.items():
    cv.require(coef >= 0, "ppo.shaping", "coefficients must be >= 0", f"{name}={coef}")
    cv.require(has_potential(registry.make(name)), "ppo.shaping",
               "this embodiment has no shaping potential (the go-to and pick-up grid bodies have one)", name)
  return coefs


def make_envs(p, names: Sequence[str]) -> list:
  """PPO's environments: the registry's bodies, wrapped in `PotentialShaping` where ``p.shaping`` names them."""
  from gea_jax.envs import registry
  from gea_jax.rl.shaping import PotentialShaping
  coefs = shaping_coefs(p)
  envs = []
  for name in names:
    env = registry.make(name)
    if coefs.get(name, 0.0) > 0:
      env = PotentialShaping(env, coefs[name], float(p.discount))
    envs.append(env)
  return envs


def validate(config, mesh: Mesh | None = None) -> None:
  """One-line ``ConfigError`` naming the first bad ``ppo.*`` key; ``mesh``: the run's (default: ``mesh.shape`` over
  all devices)."""
  from gea_jax.train import sft
  sft.validate_model(config)
  p = "ppo"
  cv.require("ppo" in config, "ppo", "a ppo section is required (gea_jax.train.ppo.ppo_defaults())")
  for k in ("iterations", "num_envs", "unroll_length", "reset_pool", "num_epochs", "num_minibatches", "lr",
            "log_every", "checkpoint_every", "keep_checkpoints", "temperature"):
    cv.positive(config, f"{p}.{k}")
  if float(config.ppo.get("sft_coef", 0.0)) > 0:
    cv.positive(config, f"{p}.sft_batch_size")
    from gea_jax.train.pipeline import embodiment_names as data_embodiments
    sft_embodiment_names(config.ppo, data_embodiments(config))
    if "sft_batch_per_step" in config.ppo:
      cv.check_type(config, f"{p}.sft_batch_per_step", bool)
  for k in ("grad_clip", "value_clip_eps", "vf_coef", "entropy_coef", "kl_coef", "reward_scaling",
            "value_warmup_iterations", "sft_coef"):
    cv.positive(config, f"{p}.{k}", allow_zero=True)
  cv.in_range(config, f"{p}.discount", 0.0, 1.0)
  lr_schedule(config.ppo)
  if "value_lr" in config.ppo:
    cv.positive(config, f"{p}.value_lr", allow_zero=True)
  if critic_kind(config.ppo) == "privileged":
    critic_fit_settings(config.ppo)
    critic_hidden(config.ppo)
  if "value_trunk_grad" in config.ppo:
    cv.in_range(config, f"{p}.value_trunk_grad", 0.0, 1.0)
  shaping_coefs(config.ppo)
  cv.in_range(config, f"{p}.gae_lambda", 0.0, 1.0)
  cv.positive(config, f"{p}.clip_eps")
  cv.one_of(config, f"{p}.train_mode", ("",) + TRAIN_MODES)
  cv.one_of(config, f"{p}.task_split", ("train", "heldout_seed", "heldout_combo"))
  if "time_limit" in config.ppo:
    cv.one_of(config, f"{p}.time_limit", ("cut", "terminal"))
  cv.require(int(config.model.value_hidden_dim) > 0, "model.value_hidden_dim", "must be > 0 (PPO needs the value head)",
             config.model.value_hidden_dim)
  cv.require(bool(config.sft.tokenizer_artifact), "sft.tokenizer_artifact",
             "must point to the RVQ artifact directory of the SFT run (WORKDIR/rvq/artifact)")
  cv.require(bool(config.data.data_dir), "data.data_dir", "must point to the datasets (normalization statistics)")
  n = len(embodiment_names(config)) * int(config.ppo.num_envs) * int(config.ppo.unroll_length)
  cv.require(n % int(config.ppo.num_minibatches) == 0, f"{p}.num_minibatches",
             f"must divide the batch of {n} transitions (embodiments x num_envs x unroll_length)",
             config.ppo.num_minibatches)
  grad_accum_steps(config.ppo)
  validate_mesh(config, mesh)


def mesh_shards(logical: str, rules, shape_of: dict[str, int]) -> tuple[int, str]:
  """How many shards the ``logical`` axis is split into under ``rules`` on a mesh of ``shape_of`` (axis -> size),
  and those mesh axes joined by "*" ("no" when it is replicated)."""
  axes = sharding.logical_to_spec((logical,), rules)[0]
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  return int(np.prod([shape_of[a] for a in axes], dtype=np.int64)), "*".join(axes) or "no"


def validate_mesh(config, mesh: Mesh | None = None, embodiments: Sequence[str] | None = None) -> None:
  """``ppo.num_envs``, the minibatch and (joint SFT) ``ppo.sft_batch_size`` split evenly over the batch axes.

  ``mesh``: the mesh the run uses (default: ``mesh.shape`` over all devices, as `sft.mesh_and_rules` builds it);
  ``embodiments``: those PPO acts in (default `embodiment_names`).
  """
  p = config.ppo
  rules = sharding.rules_from_config(config.sharding.rules) if config.get("sharding") else sharding.DEFAULT_RULES
  if mesh is None:
    cv.check_mesh(config)
    try:
      shape = sharding.resolve_mesh_shape(tuple(config.mesh.shape), jax.device_count())
    except ValueError as e:
      raise cv.ConfigError(f"mesh.shape: {e}") from None
    shape_of = dict(zip(sharding.MESH_AXES, shape))
  else:
    shape_of = dict(mesh.shape)

  check_envs_split(int(p.num_envs), rules, shape_of)
  k, axes = mesh_shards("batch", rules, shape_of)
  n = len(embodiments or embodiment_names(config)) * int(p.num_envs) * int(p.unroll_length)
  mb = n // max(int(p.num_minibatches), 1)
  cv.require(mb % k == 0, "ppo.num_minibatches",
             f"the minibatch of {mb} transitions ({n} / num_minibatches) must be divisible by the {axes} mesh size "
             f"{k} (minibatches are split over it)", p.num_minibatches)
  if float(p.get("sft_coef", 0.0)) > 0:
    cv.require(int(p.sft_batch_size) % k == 0, "ppo.sft_batch_size",
               f"must be divisible by the {axes} mesh size {k}", p.sft_batch_size)


def check_envs_split(num_envs: int, rules, shape_of: dict[str, int]) -> None:
  """A ConfigError naming ``ppo.num_envs`` unless it splits evenly over the "envs" rule's mesh axes."""
  k, axes = mesh_shards("envs", rules, shape_of)
  cv.require(num_envs % k == 0, "ppo.num_envs",
             f"must be divisible by the {axes} mesh size {k} (each embodiment's envs are split over it)", num_envs)


def embodiment_names(config) -> list[str]:
  """The bodies PPO acts in: ``ppo.embodiments``, or ``data.embodiments`` when that is empty."""
  return cv.name_list(config.ppo.embodiments) or cv.name_list(config.data.embodiments)


def sft_embodiment_names(p, known: Sequence[str]) -> list[str]:
  """The bodies of the joint SFT loss's expert batch: ``ppo.sft_embodiments`` ("" = all of ``known``, the agent's),
  each checked to be one the agent knows."""
  names = cv.name_list(p.get("sft_embodiments", "")) or list(known)
  for e in names:
    cv.require(e in known, "ppo.sft_embodiments", f"names a body the agent does not know (it knows {list(known)})",
               e)
  return names


# --- the learner ---------------------------------------------------------------------------------------


def prepare_model(model: AgentModel, config) -> tuple[Any, str]:
  """The trainable filter for ``ppo.train_mode`` (LoRA adapters are attached if absent, starting at zero)."""
  from gea_jax.models.lora import LoraConfig, LoraParam, apply_lora
  mode = str(config.ppo.get("train_mode", "") or config.model.train_mode)
  if model.vlm.value_head is None:
    raise ValueError("PPO needs the agent's value head: model.value_hidden_dim must be > 0")
  if mode in LORA_TRAIN_MODES and not jax.tree.leaves(nnx.state(model, LoraParam)):
    lc = config.model.lora
    apply_lora(model.vlm.llm, LoraConfig(rank=int(lc.rank), alpha=float(lc.alpha),
                                         target_modules=tuple(lc.target_modules)), nnx.Rngs(int(config.seed) + 7))
  mcfg = ml_collections.ConfigDict({"train_mode": mode})
  return trainable_filter(mcfg), mode


def is_value_head_path(path) -> bool:
  """Whether a parameter's pytree path lies in the agent's value head."""
  return any(getattr(k, "key", getattr(k, "name", None)) == "value_head" for k in path)


def scale_value_head(factor: float) -> optax.GradientTransformation:
  """Stateless: multiplies the value head's updates by ``factor`` (the rest pass through)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * factor if is_value_head_path(path) else u, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def grad_accum_steps(p) -> int:
  """``ppo.grad_accum`` (1 when absent), checked: a positive int that divides ``ppo.num_minibatches`` (an update's
  last accumulated gradients would otherwise carry into the next iteration's, whose policy differs)."""
  k = p.get("grad_accum", 1)
  cv.require(isinstance(k, int) and k > 0, "ppo.grad_accum", "must be a positive int", k)
  cv.require(int(p.num_minibatches) % k == 0, "ppo.grad_accum",
             f"must divide ppo.num_minibatches ({p.num_minibatches}): an update's last accumulated gradients would "
             "otherwise carry into the next iteration's", k)
  return k


LR_DECAYS = ("constant", "linear", "cosine")


def lr_schedule(p) -> float | optax.Schedule:
  """``ppo.lr``, or (``ppo.lr_decay`` linear / cosine) a schedule from it to 0 over the run's Adam steps
  (``iterations x num_epochs x num_minibatches / grad_accum``, the value warm-up's included). A run resumed with
  another ``ppo.iterations`` continues on the new schedule from the steps already taken."""
  kind = p.get("lr_decay", "constant")
  cv.require(kind in LR_DECAYS, "ppo.lr_decay", f"must be one of {', '.join(LR_DECAYS)}", kind)
  if kind == "constant":
    return float(p.lr)
  steps = int(p.iterations) * int(p.num_epochs) * int(p.num_minibatches) // grad_accum_steps(p)
  if kind == "linear":
    return optax.linear_schedule(float(p.lr), 0.0, max(steps, 1))
  return optax.cosine_decay_schedule(float(p.lr), max(steps, 1))


def make_optimizer(p) -> optax.GradientTransformation:
  """Global-norm clipping, then Adam at ``p.lr`` (decayed: `lr_schedule`); the value head's steps at ``p.value_lr``
  (decayed alike) when that is > 0; with
  ``p.grad_accum`` > 1 all of it applied once per that many gradients, to their mean (optax.MultiSteps).

  Adam's step is proportional to its learning rate, so the value head's rate is a rescaling of its steps after Adam
  (one optimizer state, laid out like the parameters).
  """
  parts = [optax.clip_by_global_norm(float(p.grad_clip))] if float(p.grad_clip) > 0 else []
  lr, value_lr = float(p.lr), float(p.get("value_lr", 0.0))
  parts.append(optax.adam(lr_schedule(p)))
  if value_lr > 0 and value_lr != lr:
    parts.append(scale_value_head(value_lr / lr))
  tx = optax.chain(*parts)
  k = grad_accum_steps(p)  # checked here too: the learner can be built without ppo.validate
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


_COMPILED: dict[Any, Any] = {}


def place_opt_state(tx: optax.GradientTransformation, opt_state, params, mesh: Mesh):
  """``opt_state`` on ``mesh``: per-parameter leaves (Adam's moments) like their parameters, the rest replicated.
  Abstract leaves (`jax.ShapeDtypeStruct`, see ``VlmPPO(compile_only=True)``) get the shardings they would have."""
  rep = NamedSharding(mesh, PartitionSpec())
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  sh = optax.tree_map_params(tx, lambda _, s: s, opt_state, param_sh, transform_non_params=lambda _: rep)
  return place(opt_state, sh)


def place(tree, shardings):
  """``tree`` on ``shardings`` (one, or a tree of them like ``tree``): arrays are put there (`sharding.put`); an
  abstract tree (`jax.ShapeDtypeStruct` leaves) only takes the shardings."""
  if all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree)):
    return sharding.abstract_on(tree, shardings)
  return sharding.put(tree, shardings)


def abstract_on_mesh(state, mesh: Mesh, rules) -> Any:
  """An abstract model state (leaves `jax.ShapeDtypeStruct`, from `nnx.eval_shape`) with each variable's sharding
  on ``mesh`` by its logical axes, as `sharding.shard_module` would place it."""
  shardings = sharding.state_shardings(state, mesh, rules)
  return jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), state, shardings,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


class VlmPPO:
  """Jitted collector (one per embodiment) and update over the split (trainable, frozen) model state.

  Everything lives on ``mesh``: the model's variables (trainable and frozen), the frozen reference policy and the
  optimizer state by their logical axes under ``rules`` (as SFT places them), each embodiment's envs (reset pool,
  scan carry, trajectory) split along their env axis over the "envs" rule's mesh axes, the update's transitions
  over the "batch" rule's. Each jitted call has fixed output shardings, so it compiles once.
  """

  def __init__(self, p, ctx: AgentContext, model: AgentModel, wrt, embodiments: Sequence[str], seed: int = 0,
               sft_iterator=None, mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES, compile_only: bool = False):
    """sft_iterator: expert batches (``sft.make_iterator``) for the joint SFT loss; required when p.sft_coef > 0.

    mesh: default one device (the first). ``model`` is placed on it in place (`sharding.shard_module`), and its
    tiny CNN encoders compute convolution gradients as im2col matmuls from then on (`use_loop_gradients`: same
    values, faster inside the update's scan, ~7% slower in a plain training step).
    compile_only: ``model`` is abstract (`nnx.eval_shape`) and ``mesh`` may be a compile-only TPU topology's: the
    learner's arrays (parameters, optimizer and critic state, mask table) are `jax.ShapeDtypeStruct` with the
    shardings they would have, for lowering ``_collect`` / ``_update`` (`gea_jax.tools.aot_compile`); it cannot
    collect or update, and needs no ``sft_iterator``.
    """
    uses_sft = float(p.get("sft_coef", 0.0)) > 0
    if uses_sft and sft_iterator is None and not compile_only:
      raise ValueError("ppo.sft_coef > 0 needs expert data: pass sft_iterator (gea_jax.train.sft.make_iterator)")
    self.p, self.ctx, self.model, self.wrt = p, ctx, model, wrt
    self.mesh = mesh if mesh is not None else sharding.make_mesh((1, 1, 1), jax.devices()[:1])
    self.rules = tuple(rules)
    self.sft_iterator = sft_iterator
    self.sft_batch_per_step = bool(p.get("sft_batch_per_step", True))
    self.sft_names = list(sft_embodiment_names(p, list(ctx.names))) if uses_sft else []
    self.sft_ids = [ctx.index(n) for n in self.sft_names]
    self.names = list(embodiments)
    self.ids = [ctx.index(n) for n in self.names]
    self.envs = make_envs(p, self.names)
    self.privileged = critic_kind(p) == "privileged"
    self.critic_features = [None] * len(self.names)
    self.critic_state = None  # (params, Adam state) of the privileged critic
    n, T = int(p.num_envs), int(p.unroll_length)
    env_axes = sharding.logical_to_spec(("envs",), self.rules)[0]
    check_envs_split(n, self.rules, dict(self.mesh.shape))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.pool_sharding = NamedSharding(self.mesh, PartitionSpec(env_axes))            # [P, ...]
    self.traj_sharding = NamedSharding(self.mesh, PartitionSpec(None, env_axes))      # [T, N, ...]
    if not compile_only:
      sharding.shard_module(model, self.mesh, self.rules)
    use_loop_gradients(model)  # the update's gradient steps run in a lax.scan: see gea_jax.models.tiny_cnn.conv_same
    self.graphdef, params, self.rest = nnx.split(model, wrt, ...)
    if compile_only:
      params, self.rest = (abstract_on_mesh(s, self.mesh, self.rules) for s in (params, self.rest))
    # The update donates its parameters and Adam state (one copy of each in device memory, not two), so the learner
    # trains a copy; the model object's own arrays are the frozen starting (SFT) policy, laid out like params.
    self.ref_params = params
    self.params = params if compile_only else jax.tree.map(jnp.copy, params)
    self.tx = make_optimizer(p)
    opt_state = jax.eval_shape(self.tx.init, params) if compile_only else self.tx.init(params)
    self.opt_state = place_opt_state(self.tx, opt_state, params, self.mesh)
    table = jnp.asarray(ctx.vocab.mask_table)
    self.mask_table = place(jax.eval_shape(lambda: table) if compile_only else table, self.replicated)
    self.seed_key = jax.random.key(int(seed))
    if self.privileged:
      self.critic_features = [privileged_features(env) for env in self.envs]
      self.critic_width = max(feature_dim(env) for env in self.envs)
      critic = PrivilegedCritic(self.critic_width + len(self.names), critic_hidden(p),
                                   rngs=nnx.Rngs(int(seed) + 11))
      self.critic_graphdef, critic_params = nnx.split(critic)
      critic_lr, self.critic_epochs = critic_fit_settings(p)
      self.critic_tx = optax.adam(critic_lr)
      critic_state = (critic_params, self.critic_tx.init(critic_params))
      self.critic_state = place(jax.eval_shape(lambda: critic_state) if compile_only else critic_state,
                                self.replicated)
    graphdef = self.graphdef
    state_sh = jax.tree.map(lambda x: x.sharding, (self.params, self.opt_state))

    self.continue_episodes = bool(p.get("continue_episodes", False))
    self.episodes = [None] * len(self.names)  # running episodes per embodiment (continue_episodes)
    out_shardings = (self.traj_sharding, self.pool_sharding) + ((self.pool_sharding,) if self.continue_episodes else ())

    def collector(e_idx):
      collect = make_collector(ctx, self.ids[e_idx], self.envs[e_idx], T, greedy=False,
                               temperature=float(p.temperature), continue_episodes=self.continue_episodes,
                               fold_lora=bool(p.get("fold_lora", True)),
                               critic_features=self.critic_features[e_idx])

      def fn(params, rest, pool, key, mask_table, start=None):
        return collect(nnx.merge(graphdef, params, rest), pool, n, key, mask_table, start)
      return jax.jit(fn, out_shardings=out_shardings)

    # Learners with the same model structure, context, embodiments, hyperparameters and mesh share compiled code
    # (a resumed run in the same process, or PPO after PPO, does not compile again).
    cache_key = (id(ctx), self.graphdef, tuple(self.names), repr(sorted(p.to_dict().items())), self.mesh,
                 self.rules, jax.tree.structure(state_sh), tuple(jax.tree.leaves(state_sh)))
    hit = _COMPILED.get(cache_key)
    if hit is None or hit[0] is not ctx:
      # donated: params, opt_state and the privileged critic's state (arguments 0, 1 and 10), replaced by the outputs
      update = jax.jit(self._update_fn, donate_argnums=(0, 1, 10),
                       out_shardings=(state_sh[0], state_sh[1], self.replicated if self.privileged else None,
                                      self.replicated))
      hit = (ctx, [collector(i) for i in range(len(self.names))], update)
      if len(_COMPILED) >= 4:
        _COMPILED.pop(next(iter(_COMPILED)))
      _COMPILED[cache_key] = hit
    _, self._collect, self._update = hit

  def critic_value(self, critic_params, features, body: int):
    """The privileged critic's values of body ``body``'s (index in ``self.names``) features ``[..., Dc]``."""
    x = critic_inputs(features, body, len(self.names), self.critic_width)
    return nnx.merge(self.critic_graphdef, critic_params)(x)

  def batch_rows(self, trajs, boots, critic_params=None):
    """The update's data from ``collect``'s trajectories and bootstrap values: GAE per embodiment, then env-major
    rows ``[N, E, T] -> N * E * T`` (each device's envs stay its rows) holding the sequences, ``old_logp``,
    ``old_value``, ``adv`` and ``target``. With the privileged critic (``critic_params``, required then) its values
    replace the value head's in GAE and ``old_value``, and the rows hold its inputs (``critic_x``). Traceable; call it
    under ``sharding.use_mesh(self.mesh, self.rules)``."""
    p, L = self.p, self.ctx.layout
    n, T = int(p.num_envs), int(p.unroll_length)
    if self.privileged and critic_params is None:
      raise ValueError("batch_rows: ppo.critic='privileged' needs critic_params (self.critic_state[0])")
    rows = []
    for i, (e, traj, boot) in enumerate(zip(self.ids, trajs, boots)):
      value = traj.value
      if self.privileged:
        critic_x = critic_inputs(traj.critic_obs, i, len(self.names), self.critic_width)  # [T, N, in_dim]
        value = nnx.merge(self.critic_graphdef, critic_params)(critic_x)
        boot = self.critic_value(critic_params, traj.next_critic_obs[-1], i)
      adv, target = embodiment_advantages(p, traj.reward, value, boot, traj.termination, traj.truncation)
      # [T, N, ...] -> [N * T, ...] (explicit sizes: -1 cannot be inferred for empty leaves, e.g. no history frames)
      env_major = lambda x: jnp.swapaxes(x, 0, 1).reshape((n * T,) + x.shape[2:])
      flat = jax.tree.map(env_major, traj)
      b = n * T
      tok_valid = jnp.broadcast_to(jnp.arange(L.action_tokens) < self.ctx.vocab.tokens_per_action(e),
                                   (b, L.action_tokens))
      seq = sequences(L, flat, tok_valid)
      rows.append(dict(input_ids=seq["input_ids"], attention_mask=seq["attention_mask"], positions=seq["positions"],
                       targets=seq["targets"], image=seq["image"], state=seq["state"],
                       embodiment_id=jnp.full((b,), e, jnp.int32), token_valid=tok_valid.astype(jnp.float32),
                       old_logp=flat.logp, old_value=env_major(value), adv=env_major(adv), target=env_major(target)))
      if self.privileged:
        rows[-1]["critic_x"] = env_major(critic_x)

    def stack(*xs):
      x = jnp.stack([x.reshape((n, T) + x.shape[1:]) for x in xs], 1)  # [N, E, T, ...]
      return self._on_batch(x.reshape((n * len(xs) * T,) + x.shape[3:]))
    return jax.tree.map(stack, *rows)

  @staticmethod
  def _on_batch(x):
    return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1))

  def _update_fn(self, params, opt_state, rest, ref_params, trajs, boots, key, mask_table, policy_weight,
                 sft_batch=None, critic_state=None):
    """One PPO update -> (params, opt_state, critic_state, metrics); ``policy_weight`` (0 during the value warm-up,
    else 1) scales every term but the value loss.

    sft_batch: None, or a batch of expert sequences whose SFT loss (x p.sft_coef) joins every minibatch's loss.
    Minibatches are drawn by a global shuffle of the whole batch (`sgd_epochs` with one shuffle block), so the
    update does not depend on the mesh; each minibatch is pinned to the batch axes.
    critic_state: the privileged critic's (params, Adam state) (``ppo.critic = "privileged"``): its values make the
    advantages, the agent's value head is not trained, and the critic regresses on the value targets after the
    policy's epochs (`_fit_critic`).
    """
    p, L, graphdef = self.p, self.ctx.layout, self.graphdef
    data = self.batch_rows(trajs, boots, None if critic_state is None else critic_state[0])
    # how much of the return's variance the baseline explains, per embodiment (before this update)
    value_metrics = {}
    for name, e in zip(self.names, self.ids):
      rows = (data["embodiment_id"] == e).astype(jnp.float32)
      mean = lambda x, rows=rows: jnp.sum(rows * x) / jnp.sum(rows)
      var_t = mean(jnp.square(data["target"] - mean(data["target"])))
      err = data["target"] - data["old_value"]
      value_metrics[f"{name}/value_explained_variance"] = 1.0 - mean(jnp.square(err - mean(err))) / jnp.maximum(
          var_t, 1e-12)
    # the expert batch: one for every step ([B, ...]), or one per step ([num_epochs, num_minibatches, B, ...])
    per_step = sft_batch if sft_batch is not None and self.sft_batch_per_step else None
    if sft_batch is not None and per_step is None:
      sft_batch = fill_action_ids(self.ctx.vocab, L, sft_batch)
    kl_coef = float(p.kl_coef)
    cand = candidate_ids(self.ctx.vocab.mask_table)  # logits over the action ids only (see action_scores)
    temp = float(p.temperature)  # the collector's sampling temperature: score the policy that drew the actions
    trunk_grad = float(p.get("value_trunk_grad", 1.0))
    ref_metrics = {}
    if kl_coef > 0:
      ref_logp, ref_ent, _, _ = action_scores(nnx.merge(graphdef, ref_params, rest), L, data, mask_table,
                                              candidate_ids=cand, temperature=temp)
      data["ref_logp"] = jnp.sum(ref_logp * data["token_valid"], 1)
      # the SFT policy's entropy on the same states: the reference for the trained policy's "entropy"
      ref_entropy = jnp.sum(ref_ent * data["token_valid"], 1)
      ref_metrics = dict(ref_entropy=jnp.mean(ref_entropy),
                         **self._per_embodiment("ref_entropy", ref_entropy, data["embodiment_id"]))

    def loss_fn(params, mb, _key, step_sft_batch=None):
      mb = jax.tree.map(self._on_batch, mb)
      model = nnx.merge(graphdef, params, rest)
      logp_tok, ent_tok, value, _ = action_scores(model, L, mb, mask_table, value_trunk_grad=policy_weight * trunk_grad,
                                                  candidate_ids=cand, temperature=temp)
      logp = jnp.sum(logp_tok * mb["token_valid"], 1)
      entropy = jnp.sum(ent_tok * mb["token_valid"], 1)
      vclip = float(p.value_clip_eps) or None
      total, m = ppo_loss(logp, mb["old_logp"], mb["adv"], value, mb["old_value"], mb["target"], entropy,
                          clip_eps=float(p.clip_eps), value_clip_eps=vclip, vf_coef=float(p.vf_coef),
                          entropy_coef=float(p.entropy_coef), normalize_advantage=False)
      del total  # recombined below: the value warm-up weighs every term but the value loss by policy_weight
      policy_terms = m["policy_loss"] - float(p.entropy_coef) * m["entropy"]
      m.update(self._per_embodiment("entropy", entropy, mb["embodiment_id"]))
      if kl_coef > 0:
        d = mb["ref_logp"] - logp
        kl_rows = jnp.exp(d) - d - 1.0  # k3 estimator of KL(pi || ref), >= 0
        kl = jnp.mean(kl_rows)
        policy_terms = policy_terms + kl_coef * kl
        m.update(kl_to_sft=kl, **self._per_embodiment("kl_to_sft", kl_rows, mb["embodiment_id"]))
      if sft_batch is not None:
        expert = sft_batch if step_sft_batch is None else fill_action_ids(
            self.ctx.vocab, L, jax.tree.map(self._on_batch, step_sft_batch))
        sl, sm = sft_loss(model, L, expert, mask_table, candidate_ids=cand, per_row=True)
        policy_terms = policy_terms + float(p.sft_coef) * sl
        m.update(sft_loss=sl)
        for name, e in zip(self.sft_names, self.sft_ids):  # each body's rows of the expert batch (see `update`)
          rows = (expert["embodiment_id"] == e).astype(jnp.float32)
          m[f"{name}/sft_nll_sum"] = jnp.sum(rows * sm["row_nll"])
          m[f"{name}/sft_tokens"] = jnp.sum(rows * sm["row_tokens"])
      if self.privileged:  # the critic is fitted on its own below; the agent's value head is left as it is
        total = policy_weight * policy_terms
        del m["value_loss"]
      else:
        total = policy_weight * policy_terms + float(p.vf_coef) * m["value_loss"]
      m.update(loss=total)
      return total, m

    params, opt_state, metrics = sgd_epochs(loss_fn, self.tx, params, opt_state, data, key,
                                            num_epochs=int(p.num_epochs), num_minibatches=int(p.num_minibatches),
                                            per_step=per_step)
    metrics.update(ref_metrics)
    metrics.update(value_metrics)
    if critic_state is not None:
      critic_state, critic_metrics = self._fit_critic(critic_state, data, jax.random.fold_in(key, 1))
      metrics.update(critic_metrics)
    return params, opt_state, critic_state, metrics

  def _fit_critic(self, critic_state, data, key):
    """The privileged critic's regression on the batch's value targets: ``ppo.critic_epochs`` x ``num_minibatches``
    Adam steps on 0.5 (V(x) - target)^2."""
    p = self.p
    cparams, copt = critic_state

    def loss_fn(cp, mb, _key):
      mb = jax.tree.map(self._on_batch, mb)
      loss = 0.5 * jnp.mean(jnp.square(nnx.merge(self.critic_graphdef, cp)(mb["x"]) - mb["target"]))
      return loss, {"critic/value_loss": loss}
    cparams, copt, m = sgd_epochs(loss_fn, self.critic_tx, cparams, copt, {"x": data["critic_x"],
                                                                            "target": data["target"]},
                                  key, num_epochs=self.critic_epochs,
                                  num_minibatches=int(p.num_minibatches))
    m["critic/grad_norm"] = m.pop("grad_norm")
    return (cparams, copt), m

  def _per_embodiment(self, label: str, x, embodiment_id) -> dict:
    """{"<embodiment>/<label>": sum of ``x`` [b] over that embodiment's rows / (b / embodiments)}.

    Every embodiment has the same share of the batch, so this is the mean over its rows on the whole batch, and on
    minibatches of it its average over an epoch's minibatches is (as `sgd_epochs` reports metrics) that mean.
    """
    out = {}
    share = x.shape[0] / len(self.names)
    for name, e in zip(self.names, self.ids):
      out[f"{name}/{label}"] = jnp.sum(jnp.where(embodiment_id == e, x, 0.0)) / share
    return out

  def collect(self, it: int):
    """Iteration ``it``'s rollouts of every embodiment: (trajectories [T, N, ...], bootstrap values, host stats)."""
    p = self.p
    key = jax.random.fold_in(self.seed_key, it)
    n = int(p.num_envs)
    trajs, boots, stats = [], [], {}
    with sharding.use_mesh(self.mesh, self.rules):
      for i, (name, e, env) in enumerate(zip(self.names, self.ids, self.envs)):
        k = jax.random.fold_in(key, i)
        pool = make_reset_pool(env, self.ctx, e, jax.random.fold_in(k, 0), n * (1 + int(p.reset_pool)),
                               str(p.task_split))
        pool = jax.device_put(pool, self.pool_sharding)
        if self.continue_episodes:
          start = self.episodes[i]
          if start is None:  # the first iteration (or a run without saved episodes): fresh ones from the pool
            start = jax.device_put(initial_episodes(self.ctx, pool, n), self.pool_sharding)
          traj, boot, self.episodes[i] = self._collect[i](self.params, self.rest, pool, jax.random.fold_in(k, 1),
                                                          self.mask_table, start)
        else:
          traj, boot = self._collect[i](self.params, self.rest, pool, jax.random.fold_in(k, 1), self.mask_table)
        trajs.append(traj)
        boots.append(boot)
        ends = float(jnp.sum(traj.termination | traj.truncation))
        stats[f"{name}/reward_per_step"] = float(jnp.mean(traj.reward))
        stats[f"{name}/episodes"] = ends
        stats[f"{name}/success_rate"] = float(jnp.sum(traj.success)) / ends if ends else float("nan")
    return trajs, boots, stats

  def update(self, it: int, trajs, boots) -> dict[str, float]:
    """Iteration ``it``'s PPO update on ``collect(it)``'s data; returns host metrics."""
    p = self.p
    key = jax.random.fold_in(self.seed_key, it)
    policy_weight = jnp.float32(0.0 if it < int(p.get("value_warmup_iterations", 0)) else 1.0)
    with sharding.use_mesh(self.mesh, self.rules):
      self.params, self.opt_state, self.critic_state, metrics = self._update(
          self.params, self.opt_state, self.rest, self.ref_params, trajs, boots, jax.random.fold_in(key, 99),
          self.mask_table, policy_weight, self._sft_batch(), self.critic_state)
    out = {k: float(v) for k, v in jax.device_get(metrics).items()}
    for name in self.sft_names:  # <body>/sft_loss: the body's summed NLL over its action tokens in the update's batches
      nll, tokens = out.pop(f"{name}/sft_nll_sum"), out.pop(f"{name}/sft_tokens")
      if tokens > 0:
        out[f"{name}/sft_loss"] = nll / tokens
    return out

  def iteration(self, it: int) -> dict[str, float]:
    """One PPO iteration (collect every embodiment, update); returns host metrics, with the wall time of each half
    (``perf/collect_seconds``, ``perf/update_seconds``: the first iteration's include compiling) and
    ``perf/env_steps_per_second`` (every body's env steps over both halves)."""
    t0 = time.perf_counter()
    trajs, boots, stats = self.collect(it)  # its host stats wait for the rollouts
    t1 = time.perf_counter()
    out = self.update(it, trajs, boots)     # returns host floats: the update has finished
    t2 = time.perf_counter()
    out.update(stats)
    env_steps = int(self.p.num_envs) * int(self.p.unroll_length) * len(self.names)
    out.update({"perf/collect_seconds": t1 - t0, "perf/update_seconds": t2 - t1,
                "perf/env_steps_per_second": env_steps / max(t2 - t0, 1e-9)})
    return out

  def _sft_batch(self):
    """The update's expert data: one batch, or (``ppo.sft_batch_per_step``) one per Adam step, stacked as
    ``[num_epochs, num_minibatches, B, ...]``."""
    if self.sft_iterator is None:
      return None
    from gea_jax.train.sft import device_batch, model_arrays
    if not self.sft_batch_per_step:
      return device_batch(next(self.sft_iterator), self.mesh)
    e, m = int(self.p.num_epochs), int(self.p.num_minibatches)
    batches = [model_arrays(next(self.sft_iterator)) for _ in range(e * m)]
    stacked = {k: np.stack([b[k] for b in batches]).reshape((e, m) + batches[0][k].shape) for k in batches[0]}
    return device_batch(stacked, self.mesh, lead_dims=2)

  def episode_arrays(self) -> dict | None:
    """The running episodes as a checkpointable tree ({embodiment: {leaf index: array}}; PRNG keys as their
    data); None when episodes do not continue or none has run yet."""
    if not self.continue_episodes or any(e is None for e in self.episodes):
      return None
    return {name: _leaf_dict(ep) for name, ep in zip(self.names, self.episodes)}

  def episode_target(self) -> dict | None:
    """A restore target for `episode_arrays`: fresh episodes of the same shapes and shardings (None when episodes
    do not continue)."""
    if not self.continue_episodes:
      return None
    n = int(self.p.num_envs)
    templates = []
    for i, (e, env) in enumerate(zip(self.ids, self.envs)):
      k = jax.random.fold_in(self.seed_key, i)
      pool = make_reset_pool(env, self.ctx, e, k, n + 1, str(self.p.task_split))
      templates.append(jax.device_put(initial_episodes(self.ctx, pool, n), self.pool_sharding))
    self._episode_templates = templates
    return {name: _leaf_dict(t) for name, t in zip(self.names, templates)}

  def set_episode_arrays(self, arrays: dict) -> None:
    """Inverse of `episode_arrays` (after `episode_target` built the templates)."""
    self.episodes = [jax.device_put(_from_leaf_dict(t, arrays[name]), self.pool_sharding)
                     for name, t in zip(self.names, self._episode_templates)]

  def checkpoint_arrays(self) -> dict | None:
    """What a checkpoint's ``arrays`` item holds: `episode_arrays` and, with the privileged critic, its parameters
    and Adam state under ``CRITIC_KEY``; None when there is neither."""
    return self._with_critic(self.episode_arrays())

  def checkpoint_target(self) -> dict | None:
    """The restore target of `checkpoint_arrays` (builds `episode_target`'s templates; the critic's current arrays
    give the shapes and shardings of its own entry)."""
    return self._with_critic(self.episode_target())

  def _with_critic(self, episodes: dict | None) -> dict | None:
    if self.critic_state is None:
      return episodes
    return {**(episodes or {}), CRITIC_KEY: _leaf_dict(self.critic_state)}

  def set_checkpoint_arrays(self, arrays: dict) -> None:
    """Inverse of `checkpoint_arrays` (after `checkpoint_target`)."""
    arrays = dict(arrays)
    if self.critic_state is not None:
      self.critic_state = jax.device_put(_from_leaf_dict(self.critic_state, arrays.pop(CRITIC_KEY)), self.replicated)
    if self.continue_episodes:
      self.set_episode_arrays(arrays)

  def sync(self) -> AgentModel:
    """Writes a copy of the trained parameters into the model object and returns it (a copy: the next update
    donates the learner's own arrays)."""
    nnx.update(self.model, jax.tree.map(jnp.copy, self.params))
    return self.model


# --- the run -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PpoResult:
  model: AgentModel
  iterations: int
  final_metrics: dict[str, float]
  curves: dict[str, list[tuple[int, float]]]
  wall_time: float
  preempted: bool = False  # stopped early by SIGTERM (its checkpoint saved): rerun the command to resume


def _is_key(x) -> bool:
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


CRITIC_KEY = "privileged_critic"  # the critic's entry in a checkpoint's arrays (beside the embodiments' episodes)


def _from_leaf_dict(template, arrays: dict):
  """Inverse of `_leaf_dict`: ``template``'s tree with its leaves from ``arrays`` (empty leaves are not saved)."""
  leaves = jax.tree.leaves(template)
  got = [arrays[f"{j:03d}"] if x.size else x for j, x in enumerate(leaves)]
  got = [jax.random.wrap_key_data(g, impl=jax.random.key_impl(x)) if _is_key(x) else g for g, x in zip(got, leaves)]
  return jax.tree.unflatten(jax.tree.structure(template), got)


def _leaf_dict(tree) -> dict:
  """{leaf index: array} of a pytree's non-empty leaves (orbax saves no zero-size arrays; PRNG keys as data)."""
  return {f"{j:03d}": jax.random.key_data(x) if _is_key(x) else x for j, x in enumerate(jax.tree.leaves(tree))
          if x.size}


def train(config, workdir: str, model: AgentModel, ctx: AgentContext, embodiments: Sequence[str] | None = None,
          *, callback=None, data_dir: str | None = None, mesh: Mesh | None = None) -> PpoResult:
  """Runs (or resumes) PPO of ``model`` in ``workdir/ppo``. ``model`` is updated in place and returned.

  ``callback(iteration, metrics)`` runs after each iteration (tests use it to inject failures).
  ``data_dir``: the expert datasets for the joint SFT loss (``ppo.sft_coef > 0``; default data.data_dir).
  ``mesh``: the device mesh (default: ``mesh.shape`` over all devices, with ``sharding.rules``); ``model`` is
  placed on it in place.
  """
  if "ppo" not in config:
    config = ml_collections.ConfigDict(config.to_dict())
    config.ppo = ppo_defaults()
  p = config.ppo
  names = list(embodiments or embodiment_names(config))
  from gea_jax.train import sft as sft_lib
  mesh, rules = sft_lib.mesh_and_rules(config, mesh)
  validate_mesh(config, mesh, names)
  wrt, mode = prepare_model(model, config)
  sft_iterator = None
  if float(p.get("sft_coef", 0.0)) > 0:
    data_dir = data_dir or str(config.data.data_dir)
    if not data_dir:
      raise ValueError("ppo.sft_coef > 0 needs the expert datasets: pass data_dir or set data.data_dir")
    # by default expert data of every embodiment the agent knows, not only those PPO acts in: it keeps what SFT taught
    sft_iterator = sft_lib.make_iterator(config, ctx, data_dir, sft_embodiment_names(p, list(ctx.names)),
                                         batch_size=int(p.sft_batch_size),
                                         seed=int(config.seed) + 1)
  learner = VlmPPO(p, ctx, model, wrt, names, seed=int(config.seed), sft_iterator=sft_iterator, mesh=mesh,
                   rules=rules)
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(learner.params))
  n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logging.info("PPO: %d trainable of %d parameters (%s), embodiments %s, mesh %s", n_train, n_total, mode, names,
               dict(mesh.shape))

  ckpt = Checkpointer(os.path.join(workdir, "ppo"), keep=int(p.keep_checkpoints),
                      save_every=int(p.checkpoint_every), config=config)
  start = 0
  arrays_target = learner.checkpoint_target() if ckpt.all_steps(reload=True) else None
  restored = ckpt.restore_latest(abstract_like(learner.params, mesh), abstract_like(learner.opt_state, mesh),
                                 abstract_like(arrays_target, mesh) if arrays_target is not None else None)
  if restored is not None:
    learner.params = restored.params
    learner.opt_state = restored.opt_state
    if restored.arrays is not None:
      learner.set_checkpoint_arrays(restored.arrays)
    elif arrays_target is not None:  # saved with ppo.continue_episodes=False (or before it existed)
      logging.warning("PPO: checkpoint %s holds no running episodes%s; they start fresh", restored.path,
                      " or privileged critic" if learner.critic_state is not None else "")
    if sft_iterator is not None and restored.data_state is not None:
      sft_iterator.set_state(restored.data_state)
    start = restored.step
    logging.info("PPO: resumed from iteration %d (%s)", start, restored.path)
  writer = MetricWriter(os.path.join(workdir, "ppo"), resume_step=start if start else None)
  preempt = install_sigterm_handler()
  total = int(p.iterations)
  metrics: dict[str, float] = {}
  t0 = time.time()
  it = start
  preempted = False
  with Progress(total, "ppo", initial=start) as bar:
    while it < total:
      metrics = learner.iteration(it)
      it += 1
      check_finite(metrics["loss"], it, checkpointer=ckpt)
      if it % int(p.log_every) == 0 or it == total:
        writer.scalars(it, {f"ppo/{k}": v for k, v in metrics.items() if np.isfinite(v)})
      bar.set_metrics(loss=metrics["loss"], **{k: v for k, v in metrics.items() if k.endswith("reward_per_step")})
      bar.update(1)
      if callback is not None:
        callback(it, metrics)
      preempted = preempt.stop_at(it)
      if ckpt.should_save(it) or it == total or preempted:
        ckpt.save(it, params=learner.params, opt_state=learner.opt_state, rng=learner.seed_key, force=True,
                  data_state=sft_iterator.get_state() if sft_iterator is not None else None,
                  arrays=learner.checkpoint_arrays(), extra={k: v for k, v in metrics.items() if np.isfinite(v)})
      if preempted:
        logging.warning("PPO: SIGTERM received; checkpoint saved at iteration %d, exiting", it)
        break
  preempt.uninstall()
  learner.sync()
  ckpt.close()
  writer.flush()
  curves = writer.curves()
  writer.close()
  return PpoResult(model=model, iterations=it, final_metrics=metrics, curves=curves, wall_time=time.time() - t0,
                   preempted=preempted)


def load_sft_model(config, sft_workdir: str, ctx: AgentContext) -> AgentModel:
  """The agent of ``config.model`` with the latest SFT checkpoint of ``sft_workdir`` (its ``sft/`` run)."""
  from gea_jax.agent.model import build_agent
  model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size, seed=int(config.seed))
  if not _load_params(config, os.path.join(sft_workdir, "sft"), model, trainable_filter(config.model)):
    raise FileNotFoundError(f"ppo.sft_workdir={sft_workdir!r}: no SFT checkpoint under {sft_workdir}/sft/checkpoints")
  return model


def _load_params(config, run_dir: str, model: AgentModel, wrt, step: int | None = None) -> bool:
  """Restores the ``wrt`` parameters of checkpoint ``step`` (None: the latest that restores) of the run in
  ``run_dir`` into ``model``, read-only; False when the run has no checkpoint at all (``step`` None only). ``config``
  names what differs from the saved config when a restore fails."""
  ck = Checkpointer(run_dir, read_only=True, config=config)
  try:
    target = abstract_like(nnx.state(model, wrt))
    restored = ck.restore_latest(target) if step is None else ck.restore(int(step), target)
  finally:
    ck.close()
  if restored is None:
    return False
  nnx.update(model, restored.params)
  return True


def saved_iterations(config, workdir: str) -> list[int]:
  """The iterations of ``workdir/ppo``'s complete checkpoints, ascending (``ppo.keep_checkpoints`` are kept)."""
  ck = Checkpointer(os.path.join(workdir, "ppo"), read_only=True, config=config)
  try:
    return ck.all_steps(reload=True)
  finally:
    ck.close()


def load_checkpoint(config, workdir: str, model: AgentModel, iteration: int) -> AgentModel:
  """Loads the policy of PPO checkpoint ``iteration`` of ``workdir/ppo`` into ``model`` in place and returns it.

  Only the trainable parameters of ``ppo.train_mode`` are stored (LoRA adapters are attached first when ``model``
  has none); the rest of ``model`` must be the run's starting agent. A missing iteration raises `CheckpointError`
  listing the saved ones. For evaluating earlier checkpoints of a finished run; `train` resumes on its own.
  """
  wrt, _ = prepare_model(model, config)
  _load_params(config, os.path.join(workdir, "ppo"), model, wrt, step=iteration)
  return model


def run(config, workdir: str) -> PpoResult:
  """PPO from an SFT run (``ppo.sft_workdir``) or, without one, from a freshly built agent."""
  from gea_jax.agent.context import load_context
  if "ppo" not in config:
    config.ppo = ppo_defaults()
  validate(config)
  names = embodiment_names(config)
  ctx = load_context(config, config.sft.tokenizer_artifact, config.data.data_dir, names)
  if config.ppo.sft_workdir:
    model = load_sft_model(config, str(config.ppo.sft_workdir), ctx)
  else:
    from gea_jax.agent.model import build_agent
    model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size,
                        seed=int(config.seed))
  result = train(config, workdir, model, ctx, names)
  if not result.preempted:
    logging.info("PPO done: %d iterations in %.1fs, final %s", result.iterations, result.wall_time,
                 result.final_metrics)
  return result
