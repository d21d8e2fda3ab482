"""Stage 1: supervised fine-tuning of the VLM agent on expert trajectories of all embodiments at once.

``python -m gea_jax.main --config=configs/sft.py --workdir=DIR`` (or as a stage of configs/default.py).

Cross-entropy on the action tokens only (the prompt layout masks everything else), plus ``sft.grounding_weight``
times the grounding loss (`gea_jax.agent.grounding`: which image token holds the instruction's object); LoRA, frozen
backbone or full fine-tuning by ``model.train_mode``; AdamW with warmup + cosine decay, gradient
clipping and accumulation (optax.MultiSteps); bfloat16 compute with float32 master weights by
``model.llm.dtype``. The step is jitted once and runs over the config's mesh (1 device or many).
Checkpoints hold the trainable parameters, optimizer state, step, RNG and the grain iterator state,
so a resumed run is bit-identical; SIGTERM saves and exits; a non-finite loss stops the run and the
last good checkpoint stays.
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gea_jax import config_validation as cv
from gea_jax import sharding
from gea_jax.agent.context import AgentContext, load_context
from gea_jax.agent.model import AgentModel, build_agent, trainable_filter
from gea_jax.agent.policy import candidate_ids, sft_loss
from gea_jax.agent.sequence import fill_action_ids, sequence_builder
from gea_jax.checkpoint import Checkpointer, abstract_like
from gea_jax.reporting import MetricWriter, Progress
from gea_jax.train.loop_utils import check_finite, install_sigterm_handler

# --- validation ---------------------------------------------------------------------------------------


def validate_model(config) -> None:
  m = config.model
  cv.one_of(config, "model.train_mode", ("lora", "full", "frozen"))
  cv.one_of(config, "model.llm.dtype", ("float32", "bfloat16"))
  if m.llm.source == "random":
    for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
      cv.positive(config, f"model.llm.{k}")
    cv.divides(config, "model.llm.num_heads", "model.llm.hidden_size")
    cv.divides(config, "model.llm.num_kv_heads", "model.llm.num_heads")
  if m.train_mode == "lora":
    cv.check_type(config, "model.lora.rank", int)
    cv.positive(config, "model.lora.rank")
    cv.positive(config, "model.lora.alpha")
  cv.one_of(config, "model.vision.encoder", ("tiny_cnn", "efficientnet_lite0", "siglip"))
  grid = tuple(m.vision.pool_grid)
  cv.require(len(grid) == 2 and min(grid) > 0, "model.vision.pool_grid", "must be two positive ints", grid)
  if "text_film" in m.vision:
    cv.check_type(config, "model.vision.text_film", bool)
    cv.require(not m.vision.text_film or m.vision.encoder == "tiny_cnn", "model.vision.text_film",
               f"FiLM conditioning is implemented for model.vision.encoder='tiny_cnn' only (encoder is "
               f"{m.vision.encoder!r})", m.vision.text_film)
  cv.positive(config, "model.text_len")
  if "grounding_head" in m:
    cv.check_type(config, "model.grounding_head", bool)
  if "state_hidden_dim" in m:
    cv.check_type(config, "model.state_hidden_dim", int)
    cv.positive(config, "model.state_hidden_dim", allow_zero=True)
  cv.positive(config, "data.history")
  cv.positive(config, "data.image_size")


def grounding_weight(config) -> float:
  """``sft.grounding_weight`` (0 when the key is absent, as in configs written before it)."""
  return float(config.sft.get("grounding_weight", 0.0))


def validate_sft(config, num_devices: int | None = None) -> None:
  """``sft.*`` and the mesh, for ``num_devices`` devices (default: this run's, ``jax.device_count()``)."""
  s = "sft"
  for k in ("steps", "batch_size", "lr", "log_every", "checkpoint_every", "keep_checkpoints", "grad_accum"):
    cv.positive(config, f"{s}.{k}")
  cv.positive(config, f"{s}.warmup_steps", allow_zero=True)
  cv.positive(config, f"{s}.grad_clip", allow_zero=True)
  cv.in_range(config, f"{s}.min_lr_ratio", 0.0, 1.0)
  cv.positive(config, f"{s}.weight_decay", allow_zero=True)
  cv.positive(config, f"{s}.num_workers", allow_zero=True)
  if "grounding_weight" in config.sft:
    cv.positive(config, f"{s}.grounding_weight", allow_zero=True)
    cv.require(not config.sft.grounding_weight or bool(config.model.get("grounding_head", False)),
               f"{s}.grounding_weight", "needs the agent's grounding head: set model.grounding_head=True (or the "
               "weight to 0)", config.sft.grounding_weight)
  if "cache_mb" in config.data:
    cv.positive(config, "data.cache_mb")
  cv.check_mesh(config)
  n = jax.device_count() if num_devices is None else int(num_devices)
  try:
    shape = sharding.resolve_mesh_shape(tuple(config.mesh.shape), n)
  except ValueError as e:
    raise cv.ConfigError(f"mesh.shape: {e}") from None
  batch_shards = shape[0] * shape[1]
  cv.require(config.sft.batch_size % batch_shards == 0, "sft.batch_size",
             f"must be divisible by the data*fsdp mesh size {batch_shards}", config.sft.batch_size)


def validate(config) -> None:
  validate_model(config)
  validate_sft(config)
  cv.require(bool(config.sft.tokenizer_artifact), "sft.tokenizer_artifact",
             "must point to an RVQ artifact directory (train one with configs/rvq.py)")
  cv.require(bool(config.data.data_dir), "data.data_dir", "must point to the datasets (data_pipelines.build)")


# --- optimizer ---------------------------------------------------------------------------------------


def lr_schedule(s) -> optax.Schedule:
  """Warmup + cosine over ``sft.steps`` optimizer updates (with accumulation, one update per k micro-batches)."""
  total = int(s.steps)
  warmup = min(int(s.warmup_steps), max(total - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, float(s.lr), max(warmup, 1), max(total, warmup + 1),
                                            end_value=float(s.lr) * float(s.min_lr_ratio))


def make_optimizer(s) -> optax.GradientTransformation:
  schedule = lr_schedule(s)  # inside MultiSteps the inner count advances once per real update
  parts = []
  if float(s.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(s.grad_clip)))
  parts.append(optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=float(s.weight_decay)))
  tx = optax.chain(*parts)
  if int(s.grad_accum) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(s.grad_accum))
  return tx


# --- the jitted step ---------------------------------------------------------------------------------


def step_fn(ctx: AgentContext, graphdef, wrt, grounding_weight: float = 0.0):
  """The SFT step before jit: ``step(state, batch, mask_table) -> (state', metrics)`` on the split state of
  ``(model, optimizer)`` (``graphdef`` from ``nnx.split((model, optimizer))``). `TrainStep` jits it; the TPU
  compile check (`gea_jax.tools.aot_compile`) lowers it for a topology."""
  vocab, layout = ctx.vocab, ctx.layout
  cand = candidate_ids(vocab.mask_table)  # logits over the action ids only (same loss, ~C instead of ~V columns)

  def step(state, batch, mask_table):
    model, optimizer = nnx.merge(graphdef, state)
    batch = fill_action_ids(vocab, layout, batch)

    def loss_fn(model):
      return sft_loss(model, layout, batch, mask_table, candidate_ids=cand, grounding_weight=grounding_weight)

    (_, metrics), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(model)
    optimizer.update(model, grads)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return nnx.state((model, optimizer)), metrics

  return step


class TrainStep:
  """The SFT step, jitted once over the split (graphdef, state) of model + optimizer.

  Working on the split state avoids NNX's graph traversal on every call and lets the state buffers be
  donated. The model/optimizer objects are only brought up to date by ``sync()`` (before checkpoints,
  evaluation and at the end). The valid-id table is an argument placed on the mesh (replicated), not a
  closed-over constant, so XLA does not constant-fold the masked softmax.
  """

  def __init__(self, ctx: AgentContext, model: AgentModel, optimizer: nnx.Optimizer, wrt, mesh,
               grounding_weight: float = 0.0):
    self.model, self.optimizer = model, optimizer
    graphdef, self.state = nnx.split((model, optimizer))
    self.mask_table = jax.device_put(ctx.vocab.mask_table,
                                     jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    self._step = jax.jit(step_fn(ctx, graphdef, wrt, grounding_weight), donate_argnums=0)

  def __call__(self, batch) -> dict[str, jax.Array]:
    self.state, metrics = self._step(self.state, batch, self.mask_table)
    return metrics

  def sync(self) -> tuple[AgentModel, nnx.Optimizer]:
    """Write the current arrays into the model and optimizer objects."""
    nnx.update((self.model, self.optimizer), self.state)
    return self.model, self.optimizer

  def reload(self) -> None:
    """Take the arrays from the objects again (after code outside the step changed them)."""
    self.state = nnx.state((self.model, self.optimizer))


MODEL_KEYS = ("input_ids", "attention_mask", "positions", "targets", "loss_mask", "image", "state", "actions",
              "embodiment_id", "target_point")


def model_arrays(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The model's keys of a pipeline batch as numpy arrays (booleans as int32)."""
  out = {}
  for k in MODEL_KEYS:
    x = np.asarray(batch[k])
    out[k] = x.astype(np.int32) if x.dtype == np.bool_ else x
  return out


def device_batch(batch: dict[str, np.ndarray], mesh, lead_dims: int = 0) -> dict[str, jax.Array]:
  """This process's part of the global batch -> global arrays sharded over the batch axes.

  lead_dims: that many leading axes come before the batch axis and are not sharded (e.g. stacked batches).
  """
  def place(x):
    spec = sharding.batch_sharding(mesh, x.ndim - lead_dims).spec
    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec(*(None,) * lead_dims, *spec)), x)
  return {k: place(x) for k, x in model_arrays(batch).items()}


def make_iterator(config, ctx: AgentContext, data_dir: str, embodiments, *, batch_size: int | None = None,
                  seed: int | None = None):
  """The grain iterator of this process's part of the SFT batches (tokenized by the agent's hook).

  batch_size, seed: the global batch and the seed (default sft.batch_size and config.seed).
  """
  from data_pipelines.pipeline import make_train_iterator
  s = config.sft
  batch_size = int(s.batch_size if batch_size is None else batch_size)
  return make_train_iterator(data_dir, embodiments, mixture_weights(config, embodiments),
                             batch_size=batch_size // jax.process_count(), seq_len=None,
                             history=int(config.data.history), tokenize=sequence_builder(ctx, embodiments),
                             seed=int(config.seed if seed is None else seed), split="train",
                             num_workers=int(s.num_workers), image_size=ctx.image_size,
                             normalization=ctx.normalization, cache_mb=int(config.data.get("cache_mb", 256)))


@dataclasses.dataclass
class SftResult:
  model: AgentModel
  ctx: AgentContext
  steps: int
  final_metrics: dict[str, float]
  wall_time: float
  curves: dict[str, list[tuple[int, float]]]
  preempted: bool = False  # stopped early by SIGTERM (its checkpoint saved): rerun the command to resume


def setup_model(config, ctx: AgentContext, mesh, rules):
  """The agent, placed on ``mesh``, its trainable filter and its optimizer."""
  s = config.sft
  model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size,
                      seed=int(config.seed))
  sharding.shard_module(model, mesh, rules)
  wrt = trainable_filter(config.model)
  optimizer = nnx.Optimizer(model, make_optimizer(s), wrt=wrt)
  sharding.shard_module(optimizer, mesh, rules)  # moments follow their parameters' logical axes
  return model, optimizer, wrt


def mesh_and_rules(config, mesh=None):
  rules = sharding.rules_from_config(config.sharding.rules) if config.get("sharding") else sharding.DEFAULT_RULES
  return (mesh if mesh is not None else sharding.make_mesh(tuple(config.mesh.shape))), rules


def train(config, workdir: str, *, artifact_dir: str, data_dir: str, embodiments=None, eval_fn=None,
          mesh=None) -> SftResult:
  """Runs (or resumes) SFT in ``workdir``. ``eval_fn(model, ctx, step) -> metrics`` runs periodically."""
  s = config.sft
  embodiments = list(embodiments or cv.name_list(config.data.embodiments))
  ctx = load_context(config, artifact_dir, data_dir, embodiments)
  mesh, rules = mesh_and_rules(config, mesh)
  model, optimizer, wrt = setup_model(config, ctx, mesh, rules)
  n_train = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, wrt)))
  n_total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  logging.info("SFT: %d trainable of %d parameters (%s)", n_train, n_total, config.model.train_mode)

  iterator = make_iterator(config, ctx, data_dir, embodiments)

  ckpt = Checkpointer(os.path.join(workdir, "sft"), keep=int(s.keep_checkpoints),
                      save_every=int(s.checkpoint_every), config=config)
  ckpt.save_assets("tokenizer", artifact_dir)
  start = 0
  resumed_metrics: dict[str, float] = {}
  restored = ckpt.restore_latest(abstract_like(nnx.state(model, wrt)), abstract_like(nnx.state(optimizer)))
  if restored is not None:
    nnx.update(model, restored.params)
    nnx.update(optimizer, restored.opt_state)
    if restored.data_state is not None:
      iterator.set_state(restored.data_state)
    start = restored.step
    resumed_metrics = {k: float(v) for k, v in (restored.extra or {}).items() if isinstance(v, (int, float))}
    logging.info("SFT: resumed from step %d (%s)", start, restored.path)

  train_step = TrainStep(ctx, model, optimizer, wrt, mesh, grounding_weight=grounding_weight(config))
  writer = MetricWriter(os.path.join(workdir, "sft"), resume_step=start if start else None)
  preempt = install_sigterm_handler()
  total = int(s.steps)
  metrics: dict[str, float] = dict(resumed_metrics)  # a finished run resumed: the last checkpoint's metrics
  t0 = time.time()
  samples = 0
  preempted = False
  with sharding.use_mesh(mesh, rules), Progress(total, "sft", initial=start) as bar:
    step = start
    while step < total:
      t_step = time.time()
      for _ in range(int(s.grad_accum)):
        batch = device_batch(next(iterator), mesh)
        out = train_step(batch)
      step += 1
      samples += int(s.batch_size) * int(s.grad_accum)
      if step % int(s.log_every) == 0 or step == total:
        metrics = {k: float(v) for k, v in jax.device_get(out).items()}
        check_finite(metrics["loss"], step, checkpointer=ckpt)
        metrics["samples_per_s"] = int(s.batch_size) * int(s.grad_accum) / max(time.time() - t_step, 1e-9)
        metrics["lr"] = float(lr_schedule(s)(step - 1))
        writer.scalars(step, {f"sft/{k}": v for k, v in metrics.items()})
        bar.set_metrics(loss=metrics["loss"], acc=metrics["token_accuracy"])
      bar.update(1)
      if eval_fn is not None and int(s.eval_every) and step % int(s.eval_every) == 0 and step < total:
        train_step.sync()
        writer.scalars(step, {f"eval/{k}": v for k, v in eval_fn(model, ctx, step).items()})
        train_step.reload()
      preempted = preempt.stop_at(step)
      save_now = ckpt.should_save(step) or step == total or preempted
      if save_now:
        if not metrics or step % int(s.log_every):
          check_finite(float(jax.device_get(out["loss"])), step, checkpointer=ckpt)
        train_step.sync()
        ckpt.save(step, params=nnx.state(model, wrt), opt_state=nnx.state(optimizer),
                  rng=jax.random.key(int(config.seed)), data_state=iterator.get_state(), force=True,
                  extra={k: float(v) for k, v in metrics.items()})
      if preempted:
        logging.warning("SFT: SIGTERM received; checkpoint saved at step %d, exiting", step)
        break
  preempt.uninstall()
  train_step.sync()
  ckpt.close()
  writer.flush()
  curves = writer.curves()
  writer.close()
  return SftResult(model=model, ctx=ctx, steps=step, final_metrics=metrics, wall_time=time.time() - t0,
                   curves=curves, preempted=preempted)


def mixture_weights(config, embodiments) -> dict[str, float] | None:
  """``data.weights`` ("reacher=3,grid_goto_ego=2"): each embodiment's share of the SFT batches, for `embodiments`.

  An embodiment the entry does not name weighs 1; entries for embodiments the run does not use are ignored (so one
  config serves runs on a subset, e.g. experiments/cross_domain.py's per-domain models). None: uniform.
  """
  def positive_number(value):
    weight = float(value)
    if not (np.isfinite(weight) and weight > 0):
      raise ValueError(value)
    return weight

  weights = cv.per_embodiment(config, "data.weights", positive_number, "positive number")
  if not weights:
    return None
  return {e: weights.get(e, 1.0) for e in embodiments}


def run(config, workdir: str) -> None:
  result = train(config, workdir, artifact_dir=config.sft.tokenizer_artifact, data_dir=config.data.data_dir)
  if not result.preempted:
    logging.info("SFT done: %d steps in %.1fs, final %s", result.steps, result.wall_time, result.final_metrics)
