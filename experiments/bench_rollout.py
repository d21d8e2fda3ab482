"""Benchmark: env-steps/s of VLM-policy rollouts, KV-cached action decoding vs recomputing the context.

    .venv/bin/python experiments/bench_rollout.py [--layers 8] [--envs 8] [--steps 8] [--rounds 3]

Same agent, same envs, same jitted collector (`gea_jax.agent.rollout.make_collector`, the one PPO uses):
per env step the prompt (text + k-frame history, layout of `gea_jax.agent.prompt`) is built on device; the
"kv_cache" variant runs the prompt once, then one cached step per further action token
(`decode_action_tokens`); the "recompute" variant re-runs the whole sequence for every action token
(`decode_without_cache`). The model is SmolLM2-135M-shaped (hidden 576, 9 heads / 3 KV heads, MLP 1536,
vocab 49152 + action codes, random weights) with ``--layers`` layers (30 = the full depth), the tiny CNN
vision encoder on 64x64 frames, and an untrained RVQ action tokenizer (``--rvq_levels`` tokens per
continuous action). Timing: a compile run, then ``--rounds`` round-robin timed runs; medians reported.

Besides the measured ratio it prints the token-count ratios of three designs (tokens through the LLM per
env step): recompute = T_a * seq_len, per-step cache = prompt_len + T_a - 1, and a cache carried across
env steps (LLaRP-style growing context) = frame_len + T_a, with T_a the layout's action slots (both decoders
run every slot; slots an embodiment does not use are masked). Last line: JSON with ``kv_cache_speedup`` (the
geometric mean over the envs of the measured ratio).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gea_jax.agent.config import agent_config
from gea_jax.agent.context import AgentContext, make_layout, resolve_text_tokenizer
from gea_jax.agent.model import build_agent
from gea_jax.agent.rollout import decode_without_cache, make_collector, make_reset_pool
from gea_jax.envs import registry
from gea_jax.interop.tokenizers import load_text_tokenizer
from gea_jax.tokenizers.action_vocab import build_vocab
from gea_jax.tokenizers.rvq import ActionTokenizer, RVQConfig


def build(args):
  names = args.envs_names.split(",")
  specs = [registry.make(n).spec for n in names]
  tok = ActionTokenizer(RVQConfig(num_levels=args.rvq_levels, codebook_size=64, latent_dim=8, hidden=32,
                                  num_layers=1), specs, rngs=nnx.Rngs(0))
  text_tok = load_text_tokenizer(resolve_text_tokenizer("smollm2"))
  vocab = build_vocab(tok, llm_vocab_size=text_tok.vocab_size)
  c = agent_config()
  c.data.image_size = 64
  m = c.model
  m.train_mode = "lora"
  m.llm.hidden_size, m.llm.intermediate_size, m.llm.num_layers = 576, 1536, args.layers
  m.llm.num_heads, m.llm.num_kv_heads = 9, 3
  layout = make_layout(c, vocab)
  max_state = max(s.state_dim for s in vocab.specs)
  ctx = AgentContext(vocab=vocab, text_tokenizer=text_tok, layout=layout, specs=tuple(vocab.specs),
                     state_stats=(None,) * len(vocab.specs), action_stats=(None,) * len(vocab.specs),
                     max_state_dim=max_state, image_size=(64, 64), normalization="none")
  model = build_agent(m, layout, max_state, vocab.total_vocab_size, seed=0)
  return ctx, model, names


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--envs", type=int, default=8)
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--rvq_levels", type=int, default=2)
  ap.add_argument("--envs_names", default="grid_goto,reacher")
  args = ap.parse_args()
  ctx, model, names = build(args)
  L = ctx.layout
  graphdef, state = nnx.split(model)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  print(f"model: SmolLM2-135M-shaped, {args.layers} layers, "
        f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) / 1e6:.1f}M params; "
        f"prompt_len={L.prompt_len} seq_len={L.seq_len} action slots={L.action_tokens} frame_len={L.frame_len}")
  rows, speedups = [], []
  for name in names:
    env = registry.make(name)
    e = ctx.index(name)
    t_a = ctx.vocab.tokens_per_action(e)
    pool = make_reset_pool(env, ctx, e, jax.random.key(1), args.envs * 3)
    fns = {}
    for variant, dec in (("kv_cache", None), ("recompute", decode_without_cache)):
      collect = make_collector(ctx, e, env, args.steps, greedy=False, decode_fn=dec)
      fns[variant] = jax.jit(lambda st, pool, key, mt, collect=collect: collect(
          nnx.merge(graphdef, st), pool, args.envs, key, mt)[0].logp)
    compile_s = {}
    for variant, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(state, pool, jax.random.key(0), mask_table))
      compile_s[variant] = time.perf_counter() - t0
    times = {v: [] for v in fns}
    for r in range(args.rounds):
      for variant, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(state, pool, jax.random.key(r + 1), mask_table))
        times[variant].append(time.perf_counter() - t0)
    sps = {v: args.envs * args.steps / statistics.median(t) for v, t in times.items()}
    speed = sps["kv_cache"] / sps["recompute"]
    speedups.append(speed)
    # Both decoders loop over all L.action_tokens slots (the layout's maximum over embodiments; unused
    # slots are masked), so the token counts use L.action_tokens, not this embodiment's t_a.
    tok_recompute = L.action_tokens * L.seq_len
    tok_cache = L.prompt_len + L.action_tokens - 1
    tok_carried = L.frame_len + L.action_tokens
    row = dict(env=name, action_tokens=t_a, kv_env_steps_per_s=round(sps["kv_cache"], 2),
               recompute_env_steps_per_s=round(sps["recompute"], 2), speedup=round(speed, 2),
               token_ratio_per_step_cache=round(tok_recompute / tok_cache, 2),
               token_ratio_carried_cache=round(tok_recompute / tok_carried, 2),
               first_call_s={k: round(v, 1) for k, v in compile_s.items()})
    rows.append(row)
    print(json.dumps(row))
  gm = float(np.exp(np.mean(np.log(speedups))))
  print(json.dumps({"kv_cache_speedup": round(gm, 2), "per_env": {r["env"]: r["speedup"] for r in rows},
                    "layers": args.layers, "envs": args.envs, "steps": args.steps,
                    "token_ratio_carried_cache": {r["env"]: r["token_ratio_carried_cache"] for r in rows}}))


if __name__ == "__main__":
  main()
