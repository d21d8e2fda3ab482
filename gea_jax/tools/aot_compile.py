"""Compile-only check of a config against a TPU topology: do its SFT step or its PPO programs fit a pod's chips, as
they would shard?

    python -m gea_jax.tools.aot_compile --config=configs/gea_smollm2.py --topology=v5e:2x4 \
        [--stage=sft|ppo] [--config.mesh.shape=1,-1,1] [--config.sft.batch_size=256] [--config.X=...]

No TPU is needed: with libtpu present (``make install`` puts it in ``.venv/tpu``; or ``pip install
"jax[tpu]==0.10.2"``), `jax.experimental.topologies.get_topology_desc` describes the topology's chips on this CPU
machine, and the SFT step (`gea_jax.train.sft.step_fn`, the function the trainer jits) is lowered and compiled by
XLA:TPU for a mesh over them: the config's ``mesh.shape`` and ``sharding.rules``, the model built from the config
(`build_agent` under `nnx.eval_shape`: no device arrays; a config with pretrained weights still reads their file),
its optimizer state, and a global batch of ``sft.batch_size`` sequences of the config's prompt layout. The compiled
program's ``memory_analysis()`` gives each chip's bytes (arguments, outputs, temporaries, aliased donations);
XLA:TPU itself refuses a program whose buffers exceed the chip's HBM. FLOPs are the matmuls and convolutions of the
traced program with every loop pass counted (`gea_jax.tools.jaxpr_flops`), split evenly over the chips: XLA's
``cost_analysis()``, also reported, counts a loop's body once (PPO's programs are loops).

``--stage=ppo`` compiles what `gea_jax.train.ppo.VlmPPO` jits instead: each embodiment's collector
(``collect/NAME``: ``ppo.unroll_length`` steps of ``ppo.num_envs`` envs with KV-cached decoding) and the update
(``update``: GAE, the epochs of minibatch Adam steps, the joint SFT batches when ``ppo.sft_coef > 0``), from a learner
built with ``compile_only=True`` (abstract parameters, optimizer and critic state on the topology's mesh; two env
resets run on the CPU for the reset pool's shapes).

Prints a table per program and, as its last line, JSON: ``topology``, ``chips``, ``mesh``, the largest program's
``bytes_per_chip`` (arguments + outputs - aliased + temporaries + code) and its parts, ``programs`` (every program's),
``hbm_bytes_per_chip`` and ``fits`` (within ``--max_hbm_fraction`` of the HBM); exits with status 1 and a message
naming the config keys to change when a program does not fit, 2 on a bad flag or a missing libtpu. The action
tokenizer is an untrained one of the shape the pipeline trains over ``data.embodiments`` (the shapes are those of a
trained one).
"""

from __future__ import annotations

import os
import sys

# libtpu is located before jax is imported: jax reads TPU_LIBRARY_PATH when it first looks for backends.
_VENV_LIBTPU = os.path.join(sys.prefix, "tpu", "libtpu", "libtpu.so")
if "TPU_LIBRARY_PATH" not in os.environ and os.path.exists(_VENV_LIBTPU):
  os.environ["TPU_LIBRARY_PATH"] = _VENV_LIBTPU
# no TPU VM here: keep libtpu from querying GCE metadata for the (absent) host's workers
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
# compiling needs no chip: let several checks run at once (libtpu otherwise holds /tmp/libtpu_lockfile per process)
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from gea_jax.tools.jaxpr_flops import FlopCounts, jaxpr_flops  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Agent config (configs/*.py).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:2x4, v4:2x2x2, v5p:2x2x2, v6e:4x4.")
_STAGE = flags.DEFINE_enum("stage", "sft", ["sft", "ppo"], "What to compile: the SFT step, or PPO's collectors "
                           "(one per embodiment) and update.")
_MAX_FRACTION = flags.DEFINE_float("max_hbm_fraction", 1.0, "Fail when the step needs more than this fraction of a "
                                   "chip's HBM (e.g. 0.9 to keep room for the evaluation's or the collector's buffers).")

# HBM per chip (bytes) by TPU generation, from Google Cloud's TPU pages.
HBM_BYTES = {"v4": 32 << 30, "v5e": 16 << 30, "v5litepod": 16 << 30, "v5p": 95 << 30, "v6e": 32 << 30}


def hbm_bytes(topology: str) -> int:
  gen = topology.split(":")[0].split("-")[0].lower()
  if gen not in HBM_BYTES:
    raise ValueError(f"--topology={topology!r}: unknown TPU generation {gen!r}; expected one of {sorted(HBM_BYTES)} "
                     "followed by ':' and the chip grid, e.g. v5e:2x4")
  return HBM_BYTES[gen]


def topology_devices(topology: str) -> list:
  """The chips of ``topology`` as compile-only TPU devices; a clear error without libtpu."""
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)
  except Exception as e:  # no libtpu, or a topology libtpu does not know
    where = os.environ.get("TPU_LIBRARY_PATH", "not set")
    raise RuntimeError(f"cannot describe TPU topology {topology!r}: {e}\n(TPU_LIBRARY_PATH: {where}; libtpu comes "
                       f"with `make install` in .venv/tpu, or `pip install \"jax[tpu]==0.10.2\"`)") from None


def compile_context(config, embodiments):
  """An `AgentContext` with the shapes of a trained one: an untrained action tokenizer of the shape the pipeline
  trains (`pipeline.stage0_config`)."""
  from gea_jax.agent.context import AgentContext, make_layout, resolve_text_tokenizer
  from gea_jax.envs import registry
  from gea_jax.interop.tokenizers import load_text_tokenizer
  from gea_jax.tokenizers.action_vocab import build_vocab
  from gea_jax.tokenizers.rvq import ActionTokenizer
  from gea_jax.train.pipeline import stage0_config
  from gea_jax.train.tokenizer import rvq_config

  specs = [registry.make(n).spec for n in embodiments]
  tok = ActionTokenizer(rvq_config(stage0_config(config, data_dir="")), specs, rngs=nnx.Rngs(0))
  text_tok = load_text_tokenizer(resolve_text_tokenizer(config.model.text_tokenizer))
  vocab = build_vocab(tok, llm_vocab_size=text_tok.vocab_size, mode=str(config.rvq.vocab_mode))
  img = int(config.data.image_size)
  return AgentContext(vocab=vocab, text_tokenizer=text_tok, layout=make_layout(config, vocab),
                      specs=tuple(vocab.specs), state_stats=(None,) * len(vocab.specs),
                      action_stats=(None,) * len(vocab.specs), max_state_dim=max(s.state_dim for s in vocab.specs),
                      image_size=(img, img), normalization="none")


def example_sequence(ctx, name: str) -> dict[str, np.ndarray]:
  """One SFT sample of embodiment ``name`` as the grain hook makes it (zeros; only its shapes and dtypes count)."""
  from gea_jax.agent.sequence import sequence_builder
  from gea_jax.train.sft import model_arrays
  spec = ctx.specs[ctx.index(name)]
  f = ctx.layout.num_frames
  sample = dict(embodiment_id=0, history_mask=np.ones(f, bool), instruction="go", state=np.zeros((f, spec.state_dim)),
                image=np.zeros((f,) + tuple(ctx.image_size) + (3,), np.uint8),
                actions=np.zeros((f, max(spec.action_space.dim, 1)), np.float32),
                is_discrete=not spec.action_space.is_continuous, action_indices=np.zeros(f, np.int32))
  return model_arrays(sequence_builder(ctx, [name])(sample))


@dataclasses.dataclass
class Program:
  """A compiled program and its matmul / convolution FLOPs counted on its jaxpr (`jaxpr_flops`)."""
  compiled: Any
  counts: FlopCounts


def compile_traced(jitted, *args) -> Program:
  """``jitted`` traced on ``args`` (abstract arrays with shardings), lowered and compiled for their devices."""
  traced = jitted.trace(*args)
  return Program(traced.lower().compile(), jaxpr_flops(traced.jaxpr))


def compile_sft_step(config, devices):
  """XLA:TPU's compiled SFT step of ``config`` on a mesh over ``devices``; returns (Program, mesh, ctx)."""
  from gea_jax import sharding
  from gea_jax.agent.model import build_agent, trainable_filter
  from gea_jax.train import pipeline, sft

  sft.validate_model(config)
  sft.validate_sft(config, num_devices=len(devices))  # sft.* and mesh.shape against the topology's chips
  embodiments = pipeline.validate_embodiments(config)
  ctx = compile_context(config, embodiments)
  mesh, rules = sft.mesh_and_rules(config, sharding.make_mesh(tuple(config.mesh.shape), devices))
  wrt = trainable_filter(config.model)

  def build():
    model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size,
                        seed=int(config.seed))
    return model, nnx.Optimizer(model, sft.make_optimizer(config.sft), wrt=wrt)

  graphdef, state = nnx.split(nnx.eval_shape(build))
  state_sh = sharding.state_shardings(state, mesh, rules)
  values = lambda tree: jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, tree,
                                     is_leaf=lambda x: isinstance(x, nnx.Variable))
  state_in = sharding.abstract_on(values(state), values(state_sh))
  b = int(config.sft.batch_size)
  one = example_sequence(ctx, embodiments[0])
  batch = {k: jax.ShapeDtypeStruct((b,) + x.shape, x.dtype, sharding=sharding.batch_sharding(mesh, x.ndim + 1, rules))
           for k, x in one.items()}
  table = np.asarray(ctx.vocab.mask_table)
  mask_table = jax.ShapeDtypeStruct(table.shape, table.dtype, sharding=NamedSharding(mesh, PartitionSpec()))
  step = sft.step_fn(ctx, graphdef, wrt, sft.grounding_weight(config))

  def split_step(state_values, batch, mask_table):  # the trainer's step on the state's plain arrays
    st = jax.tree.map(lambda v, x: v.replace(x), state, state_values, is_leaf=lambda x: isinstance(x, nnx.Variable))
    new_state, metrics = step(st, batch, mask_table)
    return values(new_state), metrics

  with sharding.use_mesh(mesh, rules):
    program = compile_traced(jax.jit(split_step, donate_argnums=0, out_shardings=(values(state_sh), None)),
                             state_in, batch, mask_table)
    return program, mesh, ctx


def _out_abstract(compiled):
  """A compiled program's outputs as `jax.ShapeDtypeStruct` with their shardings (inputs of the next program)."""
  return jax.tree.map(lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=getattr(o.sharding, "sharding",
                                                                                         o.sharding)),
                      compiled.out_info)


def _reset_pool_abstract(learner, e_idx: int, size: int):
  """The ``size``-state reset pool of ``learner``'s embodiment ``e_idx``, abstract and split over the envs' axes
  (two states are built on the CPU for their shapes)."""
  from gea_jax import sharding
  from gea_jax.agent.rollout import make_reset_pool
  pool = make_reset_pool(learner.envs[e_idx], learner.ctx, learner.ids[e_idx], jax.random.key(0), 2,
                         str(learner.p.task_split))
  return sharding.abstract_on(jax.tree.map(lambda x: jax.ShapeDtypeStruct((size,) + x.shape[1:], x.dtype), pool),
                              learner.pool_sharding)


def compile_ppo_programs(config, devices):
  """XLA:TPU's compiled PPO programs of ``config`` on a mesh over ``devices``: each embodiment's collector
  (``collect/NAME``: ``ppo.unroll_length`` steps of ``ppo.num_envs`` envs, KV-cached decoding) and the update
  (``update``: GAE, ``ppo.num_epochs`` x ``ppo.num_minibatches`` Adam steps, the joint SFT batches when
  ``ppo.sft_coef > 0``), as `gea_jax.train.ppo.VlmPPO` jits them. Returns ({name: Program}, mesh, ctx)."""
  import ml_collections

  from gea_jax import sharding
  from gea_jax.agent.model import build_agent
  from gea_jax.agent.rollout import initial_episodes
  from gea_jax.train import pipeline, ppo, sft

  config = ml_collections.ConfigDict(config.to_dict())
  if "ppo" not in config:
    config.ppo = ppo.ppo_defaults()
  # a compile-only check reads neither the tokenizer artifact nor the datasets (validate asks for both)
  config.sft.tokenizer_artifact = config.sft.tokenizer_artifact or "(compile only)"
  config.data.data_dir = config.data.data_dir or "(compile only)"
  embodiments = pipeline.validate_embodiments(config)
  sft.validate_sft(config, num_devices=len(devices))  # mesh.shape against the topology's chips
  mesh, rules = sft.mesh_and_rules(config, sharding.make_mesh(tuple(config.mesh.shape), devices))
  ppo.validate(config, mesh)
  p = config.ppo
  names = ppo.embodiment_names(config)
  ctx = compile_context(config, embodiments)

  def build():
    model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size,
                        seed=int(config.seed))
    ppo.prepare_model(model, config)  # LoRA adapters attached as the trainer attaches them
    return model

  model = nnx.eval_shape(build)
  wrt, _ = ppo.prepare_model(model, config)
  n = int(p.num_envs)
  # what runs for real (the learner's small host-side arrays, two env resets for the pool's shapes) runs on the CPU:
  # the TPU backend here only compiles
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    learner = ppo.VlmPPO(p, ctx, model, wrt, names, seed=int(config.seed), mesh=mesh, rules=rules,
                         compile_only=True)
    pools = [_reset_pool_abstract(learner, i, n * (1 + int(p.reset_pool))) for i in range(len(names))]
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=learner.replicated)
  programs, trajs, boots = {}, [], []
  with sharding.use_mesh(mesh, rules):
    for i, (name, pool) in enumerate(zip(names, pools)):
      args = [learner.params, learner.rest, pool, key, learner.mask_table]
      if learner.continue_episodes:
        start = jax.eval_shape(lambda pool: initial_episodes(ctx, pool, n), pool)
        args.append(sharding.abstract_on(start, learner.pool_sharding))
      programs[f"collect/{name}"] = compile_traced(learner._collect[i], *args)
      out = _out_abstract(programs[f"collect/{name}"].compiled)
      trajs.append(out[0])
      boots.append(out[1])
    sft_batch = None
    if learner.sft_names:
      one = example_sequence(ctx, learner.sft_names[0])
      b = int(p.sft_batch_size)
      lead = (int(p.num_epochs), int(p.num_minibatches)) if learner.sft_batch_per_step else ()
      sft_batch = {k: jax.ShapeDtypeStruct(lead + (b,) + x.shape, x.dtype, sharding=NamedSharding(
          mesh, PartitionSpec(*(None,) * len(lead), *sharding.batch_sharding(mesh, x.ndim + 1, rules).spec)))
          for k, x in one.items()}
    weight = jax.ShapeDtypeStruct((), np.float32, sharding=learner.replicated)
    programs["update"] = compile_traced(learner._update, learner.params, learner.opt_state, learner.rest,
                                        learner.ref_params, trajs, boots, key, learner.mask_table, weight, sft_batch,
                                        learner.critic_state)
  return programs, mesh, ctx


def memory_report(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  parts = dict(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
               alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
               code_bytes=int(m.generated_code_size_in_bytes))
  parts["bytes_per_chip"] = (parts["argument_bytes"] + parts["output_bytes"] - parts["alias_bytes"]
                             + parts["temp_bytes"] + parts["code_bytes"])
  return parts


_ADVICE = {
    "sft": "Lower sft.batch_size (or raise sft.grad_accum), shard parameters over more chips (mesh.shape's fsdp "
           "entry), or set model.llm.remat=True",
    "ppo": "Lower ppo.num_envs, raise ppo.num_minibatches (a smaller minibatch per Adam step), lower "
           "ppo.sft_batch_size, shard parameters over more chips (mesh.shape's fsdp entry), or set model.llm.remat=True",
}


def _too_big(stage: str, topology: str, needed: str) -> None:
  what = "SFT step" if stage == "sft" else "PPO programs"
  print(f"aot_compile: the {what} do{'es' if stage == 'sft' else ''} not fit a {topology} chip: {needed}. "
        f"{_ADVICE[stage]}", file=sys.stderr)


def _xla_flops(compiled) -> float | None:
  """XLA's own count: every loop body once (see gea_jax.tools.jaxpr_flops)."""
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  return None if math.isnan(flops) else flops


def flop_report(program: Program, chips: int) -> dict:
  """``flops_per_chip``: the program's matmul + convolution FLOPs (each loop body times its trip count; from its
  jaxpr, `jaxpr_flops`) over the chips, as if they split the work evenly; ``while_loops``: loops of run-time length,
  counted once; ``xla_flops_bodies_once``: XLA's cost analysis of one chip's program, which counts a loop body once
  and elementwise work too."""
  return dict(flops_per_chip=program.counts.flops / chips, while_loops=program.counts.while_loops,
              xla_flops_bodies_once=_xla_flops(program.compiled))


def _sizes(config, stage: str) -> dict:
  if stage == "sft":
    return dict(batch_size=int(config.sft.batch_size))
  p = config.get("ppo") or {}
  return dict(num_envs=p.get("num_envs"), unroll_length=p.get("unroll_length"), num_minibatches=p.get("num_minibatches"))


def main(argv):
  del argv
  config = _CONFIG.value
  topology = _TOPOLOGY.value
  stage = _STAGE.value
  try:
    hbm = hbm_bytes(topology)
    devices = topology_devices(topology)
    if stage == "sft":
      program, mesh, ctx = compile_sft_step(config, devices)
      programs = {"sft_step": program}
    else:
      programs, mesh, ctx = compile_ppo_programs(config, devices)
  except (ValueError, RuntimeError) as e:
    if "RESOURCE_EXHAUSTED" in str(e):  # XLA:TPU refuses programs whose buffers exceed the chip's HBM
      _too_big(stage, topology, str(e).splitlines()[0])
      print(json.dumps(dict(topology=topology, stage=stage, **_sizes(config, stage), fits=False)))
      sys.exit(1)
    print(f"aot_compile: {e}", file=sys.stderr)
    sys.exit(2)
  reports = {name: dict(memory_report(p.compiled), **flop_report(p, len(devices))) for name, p in programs.items()}
  largest = max(reports, key=lambda k: reports[k]["bytes_per_chip"])
  gib = lambda x: f"{x / 2**30:.3f} GiB"
  shape = (f"global batch {int(config.sft.batch_size)} x {ctx.layout.seq_len} tokens" if stage == "sft" else
           ", ".join(f"{k} {v}" for k, v in _sizes(config, stage).items()) + f", {ctx.layout.seq_len}-token prompts")
  print(f"topology {topology}: {len(devices)} chips ({devices[0].device_kind}), HBM {gib(hbm)} per chip; "
        f"mesh {dict(mesh.shape)}; {stage.upper()}: {shape}")
  for name, r in reports.items():
    print(f"  {name}{'  (largest)' if len(reports) > 1 and name == largest else ''}")
    for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes", "bytes_per_chip"):
      print(f"    {k:<16} {gib(r[k]):>14}")
    print(f"    flops per chip   {r['flops_per_chip']:.3e}  (matmuls and convolutions, every loop pass, split evenly; "
          f"XLA's count, loop bodies once: {r['xla_flops_bodies_once'] or float('nan'):.3e})")
    if r["while_loops"]:
      print(f"    ({r['while_loops']} while loops of run-time length: their bodies counted once)")
  fraction = float(_MAX_FRACTION.value)
  mem = reports[largest]
  fits = mem["bytes_per_chip"] <= fraction * hbm
  out = dict(topology=topology, chips=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
             stage=stage, **_sizes(config, stage), seq_len=ctx.layout.seq_len, largest=largest, **mem,
             hbm_bytes_per_chip=hbm, hbm_fraction=round(mem["bytes_per_chip"] / hbm, 4), max_hbm_fraction=fraction,
             fits=fits, programs=reports)
  if not fits:
    _too_big(stage, topology, f"{largest} needs {gib(mem['bytes_per_chip'])} per chip, more than {fraction:g} x its "
             f"HBM of {gib(hbm)}")
  print(json.dumps(out))
  if not fits:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
