"""Benchmark: one AdamW training step of a SmolLM2-135M-shaped Llama, JAX vs transformers/PyTorch.

    .venv/bin/python experiments/bench_llm_step.py [--steps 3] [--layers 30] [--skip_torch]

Measures in one run, on the same machine: the XLA f32 matmul ceiling (2048^3), the JAX full
fine-tuning step, the JAX LoRA (r=16, all attention + MLP projections) step, and the PyTorch full
fine-tuning step (batch 4, sequence 256, random init). The four run round robin (a warm-up round,
then --steps timed rounds; medians reported) so each sees the same background load on a shared
machine. Prints a table, then as its last line one
JSON object with tokens_per_s_jax, tokens_per_s_torch, ratio_vs_torch, lora_tokens_per_s and
fraction_of_matmul_peak (6 * N * T model FLOPs of the full step / seconds / matmul peak).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gea_jax.models.llm import CausalLM, LlmConfig
from gea_jax.models.lora import LoraConfig, LoraParam, apply_lora

SMOLLM2_135M = LlmConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192)


def matmul_fn(n: int = 2048):
  """A runner of one XLA f32 n^3 matmul, and its FLOPs."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  return lambda: f(a, b).block_until_ready(), 2 * n ** 3


def lm_loss(model: CausalLM, ids: jax.Array) -> jax.Array:
  """Next-token cross-entropy; logits and their softmax fused by XLA into one pass over the vocab."""
  hidden = model.forward(ids[:, :-1], compute_logits=False).hidden_states
  logits = model.lm_logits(hidden)
  lse = jax.nn.logsumexp(logits, axis=-1)
  tgt = jnp.take_along_axis(logits, ids[:, 1:, None], axis=-1)[..., 0]
  return jnp.mean(lse - tgt)


def make_step(model: CausalLM, trainable, tx):
  """A jitted (params, opt_state, frozen, ids) -> (params, opt_state, loss) with donated buffers."""
  graphdef, train, frozen = nnx.split(model, trainable, ...)
  opt_state = tx.init(train)

  def step(train, opt_state, frozen, ids):
    def loss_fn(train):
      return lm_loss(nnx.merge(graphdef, train, frozen), ids)
    loss, grads = jax.value_and_grad(loss_fn)(train)
    updates, opt_state = tx.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1)), train, opt_state, frozen


def jax_step_fn(cfg: LlmConfig, ids: np.ndarray, lora_rank: int | None):
  """A runner of one compiled JAX training step (full or LoRA), and the compile time."""
  model = CausalLM(cfg, rngs=nnx.Rngs(0))
  trainable = nnx.Param
  if lora_rank:
    apply_lora(model, LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank), nnx.Rngs(1))
    trainable = LoraParam
  tx = optax.adamw(1e-4, weight_decay=0.01)
  step, train, opt_state, frozen = make_step(model, trainable, tx)
  del model
  ids = jnp.asarray(ids)
  t0 = time.perf_counter()
  compiled = step.lower(train, opt_state, frozen, ids).compile()
  compile_s = time.perf_counter() - t0
  state = {"train": train, "opt": opt_state}

  def run():
    state["train"], state["opt"], loss = compiled(state["train"], state["opt"], frozen, ids)
    loss.block_until_ready()

  return run, compile_s


def torch_step_fn(cfg: LlmConfig, ids: np.ndarray):
  """A runner of one transformers/PyTorch AdamW step of the same model."""
  import torch
  import transformers

  torch.manual_seed(0)
  hf_cfg = transformers.LlamaConfig(**{k: v for k, v in cfg.to_hf_dict().items()
                                       if k not in ("architectures", "model_type", "dtype")})
  model = transformers.LlamaForCausalLM(hf_cfg)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  x = torch.tensor(ids, dtype=torch.long)

  def run():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=x[:, :-1], labels=x[:, :-1]).loss  # HF shifts labels internally
    loss.backward()
    opt.step()

  return run


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--layers", type=int, default=SMOLLM2_135M.num_hidden_layers)
  p.add_argument("--lora_rank", type=int, default=16)
  p.add_argument("--skip_torch", action="store_true")
  args = p.parse_args()

  cfg = SMOLLM2_135M.replace(num_hidden_layers=args.layers)
  ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
  tokens = args.batch * args.seq
  n_params = cfg.num_params()
  flops = 6 * n_params * tokens

  mm, mm_flops = matmul_fn()
  runners = {"matmul": lambda: [mm() for _ in range(5)]}
  runners["full"], c_full = jax_step_fn(cfg, ids, None)
  runners["lora"], c_lora = jax_step_fn(cfg, ids, args.lora_rank)
  if not args.skip_torch:
    runners["torch"] = torch_step_fn(cfg, ids)
  # Round robin (one warm-up round, then --steps timed rounds) so that every contender sees the
  # same background load; the machine is shared, so absolute times drift, ratios much less.
  times: dict[str, list[float]] = {k: [] for k in runners}
  for rnd in range(args.steps + 1):
    for name, fn in runners.items():
      t = timed(fn)
      if rnd:
        times[name].append(t)
    print(f"round {rnd}: " + ", ".join(f"{k} {v[-1] if rnd else 0:.2f}s" for k, v in times.items()), flush=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  peak = 5 * mm_flops / med["matmul"]
  t_full, t_lora = med["full"], med["lora"]
  t_torch = med.get("torch", float("nan"))
  # per round: the step's model FLOP rate over the matmul rate measured right beside it
  fractions = [flops / f / (5 * mm_flops / m) for f, m in zip(times["full"], times["matmul"])]

  rows = [("xla f32 matmul 2048^3", None, peak / 1e9),
          ("jax full fine-tune", t_full, flops / t_full / 1e9), ("jax lora r=%d" % args.lora_rank, t_lora, None),
          ("torch full fine-tune", t_torch, flops / t_torch / 1e9)]
  print(f"model: {n_params / 1e6:.1f}M params, {cfg.num_hidden_layers} layers; batch {args.batch} x seq "
        f"{args.seq} = {tokens} tokens; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cpus; compile: full {c_full:.1f}s, lora {c_lora:.1f}s")
  print(f"{'what':34s} {'s/step':>8s} {'tokens/s':>9s} {'GFLOP/s':>8s}")
  for name, t, gf in rows:
    tps = f"{tokens / t:9.1f}" if t is not None else " " * 9
    ts = f"{t:8.2f}" if t is not None else " " * 8
    gfs = f"{gf:8.1f}" if gf is not None else " " * 8
    print(f"{name:34s} {ts} {tps} {gfs}")
  result = {
    "tokens_per_s_jax": round(tokens / t_full, 2),
    "tokens_per_s_torch": round(tokens / t_torch, 2),
    "ratio_vs_torch": round(t_torch / t_full, 3),
    "lora_tokens_per_s": round(tokens / t_lora, 2),
    "lora_speedup_vs_full": round(t_full / t_lora, 3),
    "fraction_of_matmul_peak": round(flops / t_full / peak, 3),
    "fraction_of_matmul_peak_per_round": [round(f, 3) for f in fractions],
    "matmul_peak_gflops": round(peak / 1e9, 1),
    "model_params": n_params,
  }
  print(json.dumps(result))


if __name__ == "__main__":
  main()
