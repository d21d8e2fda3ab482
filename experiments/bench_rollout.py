"""Benchmark: env-steps/s of VLM-policy rollouts, text-prefix KV cache vs recomputing the context.

    .venv/bin/python experiments/bench_rollout.py [--layers 8] [--envs 8] [--steps 8] [--rounds 3]

Same agent, same envs, same jitted collector (`gea_jax.agent.rollout.make_collector`, the one PPO uses):
per env step the prompt (text + k-frame history, layout of `gea_jax.agent.prompt`) is built on device.
Three decoders:

* "kv_cache" (the collector's default): the KV cache of the text part (embodiment prompt + instruction,
  ``text_len`` slots) is computed once per collect call and carried across env steps in the scan; on a step
  where some env was reset it is recomputed for the reset rows (`refresh_prefix_rows`). Per env step only
  the frame part of the prompt (history frames + current frame) runs on top of it (writing its slots in place
  into the carried buffers, `reuse_prefix_buffers`), then one cached step per further action token
  (`decode_action_tokens(..., prefix_cache=...)`);
* "per_step_cache": the whole prompt runs every env step, then one cached step per further action token
  (`decode_action_tokens` without a prefix, ``make_collector(..., prefix_cache=False)``);
* "recompute": the whole sequence re-runs for every action token (`decode_without_cache`).

``kv_cache_speedup`` = kv_cache env-steps/s / recompute env-steps/s (geometric mean over the envs);
the per-step cache's ratio to recompute is reported beside it. The model is SmolLM2-135M-shaped (hidden
576, 9 heads / 3 KV heads, MLP 1536, vocab 49152 + action codes, random weights) with ``--layers`` layers
(30 = the full depth), the tiny CNN vision encoder on 64x64 frames, and an untrained RVQ action tokenizer
(``--rvq_levels`` tokens per continuous action). Timing: a compile run, then ``--rounds`` round-robin
timed runs; medians reported. Every variant encodes all k+1 frames with the vision encoder, decodes the
action with the RVQ decoder and steps (and renders) the envs each step: those costs are shared. Every variant
folds the LoRA adapters into the kernels once per call (the collector's default ``fold_lora``); ``--fold_lora 0``
runs them beside the kernels, as before 2026-11-23.

It also prints the tokens run through the LLM per env step and row, with T_a = the layout's action slots
(every decoder runs every slot; slots an embodiment does not use are masked): recompute = T_a * seq_len,
per-step cache = prompt_len + T_a - 1, text-prefix cache = (prompt_len - text_len) + T_a - 1 plus text_len
x (rows run through the prefix) / (N x steps): all N rows before the scan, then after each step with resets
the reset rows rounded up to the collector's ``prefix_chunk`` (ceil(N / 4)); counted from the timed kv_cache
runs (episodes start fresh each call, so short runs have few or no resets). These counts ignore that cached
attention still reads all cached slots. Last line: JSON with ``kv_cache_speedup``.

``--history`` (the layout's k, ``data.history``) and ``--pool`` (image tokens per frame = pool^2) override
`gea_jax.agent.config.agent_config`'s defaults (default: keep them; the recorded runs name theirs).
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
  if getattr(args, "history", None) is not None:
    c.data.history = args.history
  if getattr(args, "pool", None) is not None:
    c.model.vision.pool_grid = (args.pool, args.pool)
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


def model_arguments(ap: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The flags `build` reads (model, layout, envs), shared with experiments/profile_rollout.py."""
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--envs", type=int, default=8)
  ap.add_argument("--steps", type=int, default=8)
  ap.add_argument("--rvq_levels", type=int, default=2)
  ap.add_argument("--envs_names", default="grid_goto,reacher")
  ap.add_argument("--history", type=int, default=None, help="data.history (k frames); default: agent_config's")
  ap.add_argument("--pool", type=int, default=None, help="image tokens per frame = pool^2; default: agent_config's")
  return ap


def main():
  ap = model_arguments(argparse.ArgumentParser())
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--fold_lora", type=int, default=1, choices=(0, 1),
                  help="the collector's fold_lora (1, its default: LoRA folded into the kernels once per call)")
  args = ap.parse_args()
  ctx, model, names = build(args)
  L = ctx.layout
  graphdef, state = nnx.split(model)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  print(f"model: SmolLM2-135M-shaped, {args.layers} layers, "
        f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) / 1e6:.1f}M params; "
        f"text_len={L.text_len} prompt_len={L.prompt_len} seq_len={L.seq_len} action slots={L.action_tokens} "
        f"frame_len={L.frame_len} history frames={L.history}")
  rows = []
  for name in names:
    env = registry.make(name)
    e = ctx.index(name)
    t_a = ctx.vocab.tokens_per_action(e)
    pool = make_reset_pool(env, ctx, e, jax.random.key(1), args.envs * 3)
    fns = {}
    variants = (("kv_cache", dict()), ("per_step_cache", dict(prefix_cache=False)),
                ("recompute", dict(decode_fn=decode_without_cache)))
    for variant, kw in variants:
      collect = make_collector(ctx, e, env, args.steps, greedy=False, fold_lora=bool(args.fold_lora), **kw)

      def run(st, pool, key, mt, collect=collect):
        traj = collect(nnx.merge(graphdef, st), pool, args.envs, key, mt)[0]
        return traj.logp, jnp.sum(traj.termination | traj.truncation, axis=1)  # [T, N], [T] resets per step
      fns[variant] = jax.jit(run)
    compile_s = {}
    for variant, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(state, pool, jax.random.key(0), mask_table))
      compile_s[variant] = time.perf_counter() - t0
    times = {v: [] for v in fns}
    reset_steps = []  # per timed kv_cache run: scan steps after which some env reset
    prefix_rows = []  # per timed kv_cache run: rows run through the text prefix (N at the start + refreshes)
    chunk = -(-args.envs // 4)  # make_collector's default prefix_chunk
    for r in range(args.rounds):
      for variant, f in fns.items():
        t0 = time.perf_counter()
        _, reset = jax.block_until_ready(f(state, pool, jax.random.key(r + 1), mask_table))
        times[variant].append(time.perf_counter() - t0)
        if variant == "kv_cache":
          reset = np.asarray(reset)
          reset_steps.append(int(np.sum(reset > 0)))
          prefix_rows.append(args.envs + int(np.sum(chunk * -(-reset // chunk))))
    sps = {v: args.envs * args.steps / statistics.median(t) for v, t in times.items()}
    # Tokens through the LLM per env step and row; every decoder loops over all L.action_tokens slots (the
    # layout's maximum over embodiments; unused slots are masked), so the counts use L.action_tokens, not t_a.
    frames = L.prompt_len - L.text_len
    tok = {"recompute": L.action_tokens * L.seq_len, "per_step_cache": L.prompt_len + L.action_tokens - 1,
           "kv_cache": frames + L.action_tokens - 1
           + L.text_len * statistics.mean(prefix_rows) / (args.envs * args.steps)}
    steady = frames + L.action_tokens - 1  # the prefix cache with no reset and the prefix computation excluded
    row = dict(env=name, action_tokens=t_a, kv_env_steps_per_s=round(sps["kv_cache"], 2),
               per_step_cache_env_steps_per_s=round(sps["per_step_cache"], 2),
               recompute_env_steps_per_s=round(sps["recompute"], 2),
               speedup=round(sps["kv_cache"] / sps["recompute"], 2),
               per_step_cache_speedup=round(sps["per_step_cache"] / sps["recompute"], 2),
               kv_over_per_step_cache=round(sps["kv_cache"] / sps["per_step_cache"], 2),
               llm_tokens_per_env_step={k: round(v, 1) for k, v in tok.items()},
               token_ratio_per_step_cache=round(tok["recompute"] / tok["per_step_cache"], 2),
               token_ratio_kv_cache=round(tok["recompute"] / tok["kv_cache"], 2),
               token_ratio_kv_cache_no_resets=round(tok["recompute"] / steady, 2),
               reset_steps_per_run=reset_steps, prefix_rows_per_run=prefix_rows,
               first_call_s={k: round(v, 1) for k, v in compile_s.items()})
    rows.append(row)
    print(json.dumps(row))
  gm = lambda key: round(float(np.exp(np.mean(np.log([r[key] for r in rows])))), 2)
  print(f"\n{'env':<10} {'variant':<15} {'env-steps/s':>11} {'vs recompute':>12} {'LLM tokens/env step':>20}")
  for r in rows:
    for variant, sps_key, ratio in (("kv_cache", "kv_env_steps_per_s", r["speedup"]),
                                    ("per_step_cache", "per_step_cache_env_steps_per_s", r["per_step_cache_speedup"]),
                                    ("recompute", "recompute_env_steps_per_s", 1.0)):
      print(f"{r['env']:<10} {variant:<15} {r[sps_key]:>11.2f} {ratio:>12.2f} "
            f"{r['llm_tokens_per_env_step'][variant]:>20.1f}")
  print(json.dumps({"kv_cache_speedup": gm("speedup"), "per_env": {r["env"]: r["speedup"] for r in rows},
                    "per_step_cache_speedup": gm("per_step_cache_speedup"),
                    "kv_over_per_step_cache": gm("kv_over_per_step_cache"),
                    "layers": args.layers, "envs": args.envs, "steps": args.steps, "fold_lora": args.fold_lora,
                    "token_ratio_kv_cache": {r["env"]: r["token_ratio_kv_cache"] for r in rows},
                    "reset_steps_per_run": {r["env"]: r["reset_steps_per_run"] for r in rows}}))

if __name__ == "__main__":
  main()
