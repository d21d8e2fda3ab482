"""Compile-only check of a config against a TPU topology: does its SFT step fit a pod's chips, as it would shard?

    python -m gea_jax.tools.aot_compile --config=configs/gea_smollm2.py --topology=v5e:2x4 \
        [--config.mesh.shape=1,-1,1] [--config.sft.batch_size=256] [--config.X=...]

No TPU is needed: with libtpu present (``make install`` puts it in ``.venv/tpu``; or ``pip install
"jax[tpu]==0.10.2"``), `jax.experimental.topologies.get_topology_desc` describes the topology's chips on this CPU
machine, and the SFT step (`gea_jax.train.sft.step_fn`, the function the trainer jits) is lowered and compiled by
XLA:TPU for a mesh over them: the config's ``mesh.shape`` and ``sharding.rules``, the model built from the config
(`build_agent` under `nnx.eval_shape`: no device arrays; a config with pretrained weights still reads their file),
its optimizer state, and a global batch of ``sft.batch_size`` sequences of the config's prompt layout. The compiled
program's ``memory_analysis()`` gives each chip's bytes (arguments, outputs, temporaries, aliased donations) and
``cost_analysis()`` its FLOPs; XLA:TPU itself refuses a program whose buffers exceed the chip's HBM.

Prints a table and, as its last line, JSON: ``topology``, ``chips``, ``mesh``, ``bytes_per_chip`` (arguments +
outputs - aliased + temporaries + code), its parts, ``hbm_bytes_per_chip`` and ``fits`` (within ``--max_hbm_fraction``
of the HBM); exits with status 1 and a message naming the config keys to change when the step does not fit, 2 on a
bad flag or a missing libtpu. The action tokenizer is an untrained one of the shape the pipeline trains over
``data.embodiments`` (the shapes are those of a trained one). PPO's collector and update are not compiled here.
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

import json  # noqa: E402
import math  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Agent config (configs/*.py).")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology, e.g. v5e:2x4, v4:2x2x2, v5p:2x2x2, v6e:4x4.")
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


def abstract(tree, shardings):
  """``tree``'s leaves as `jax.ShapeDtypeStruct` with the given shardings (same structure)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def compile_sft_step(config, devices):
  """XLA:TPU's compiled SFT step of ``config`` on a mesh over ``devices``; returns (compiled, mesh, ctx)."""
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
  state_in = abstract(values(state), values(state_sh))
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
    lowered = jax.jit(split_step, donate_argnums=0, out_shardings=(values(state_sh), None)).lower(
        state_in, batch, mask_table)
    return lowered.compile(), mesh, ctx


def memory_report(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  parts = dict(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
               alias_bytes=int(m.alias_size_in_bytes), temp_bytes=int(m.temp_size_in_bytes),
               code_bytes=int(m.generated_code_size_in_bytes))
  parts["bytes_per_chip"] = (parts["argument_bytes"] + parts["output_bytes"] - parts["alias_bytes"]
                             + parts["temp_bytes"] + parts["code_bytes"])
  return parts


def _too_big(topology: str, needed: str) -> None:
  print(f"aot_compile: the SFT step does not fit a {topology} chip: {needed}. Lower sft.batch_size (or raise "
        "sft.grad_accum), shard parameters over more chips (mesh.shape's fsdp entry), or set model.llm.remat=True",
        file=sys.stderr)


def main(argv):
  del argv
  config = _CONFIG.value
  topology = _TOPOLOGY.value
  try:
    hbm = hbm_bytes(topology)
    devices = topology_devices(topology)
    compiled, mesh, ctx = compile_sft_step(config, devices)
  except (ValueError, RuntimeError) as e:
    if "RESOURCE_EXHAUSTED" in str(e):  # XLA:TPU refuses programs whose buffers exceed the chip's HBM
      _too_big(topology, str(e).splitlines()[0])
      print(json.dumps(dict(topology=topology, stage="sft", batch_size=int(config.sft.batch_size), fits=False)))
      sys.exit(1)
    print(f"aot_compile: {e}", file=sys.stderr)
    sys.exit(2)
  mem = memory_report(compiled)
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  gib = lambda x: f"{x / 2**30:.3f} GiB"
  print(f"topology {topology}: {len(devices)} chips ({devices[0].device_kind}), HBM {gib(hbm)} per chip; "
        f"mesh {dict(mesh.shape)}; SFT step, global batch {int(config.sft.batch_size)} x {ctx.layout.seq_len} tokens")
  for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "code_bytes", "bytes_per_chip"):
    print(f"  {k:<16} {gib(mem[k]):>14}")
  print(f"  flops per chip   {flops:.3e}")
  fraction = float(_MAX_FRACTION.value)
  fits = mem["bytes_per_chip"] <= fraction * hbm
  out = dict(topology=topology, chips=len(devices), device_kind=devices[0].device_kind, mesh=dict(mesh.shape),
             stage="sft", batch_size=int(config.sft.batch_size), seq_len=ctx.layout.seq_len, **mem,
             hbm_bytes_per_chip=hbm, hbm_fraction=round(mem["bytes_per_chip"] / hbm, 4), max_hbm_fraction=fraction,
             flops_per_chip=None if math.isnan(flops) else flops, fits=fits)
  if not fits:
    _too_big(topology, f"{gib(mem['bytes_per_chip'])} per chip, more than {fraction:g} x its HBM of {gib(hbm)}")
  print(json.dumps(out))
  if not fits:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
