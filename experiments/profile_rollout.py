"""Where one env step of the VLM-policy PPO collector spends its time: the pieces timed in isolation.

    .venv/bin/python experiments/profile_rollout.py [--layers 8] [--envs 8] [--history K] [--pool G]

Same model and envs as `experiments/bench_rollout.py` (its ``build``). Each piece is jitted alone, run on
the shapes one collector step sees (N envs), and timed as the median of ``--reps`` calls after a warm-up:
env physics, the pixel renderer, the whole env step, the vision encoder on the prompt's frames, the text
prefix cache, its refresh after one env reset, the frame part on top of it, one cached action-token step, the
whole prompt (per-step cache), the whole sequence (one recompute pass), the logits of one action token (whole
vocabulary / action ids only), RVQ decoding, and one whole policy step / collector step (total / steps,
including the prefix, resets and the bootstrap value) per variant.
Pieces overlap (the policy step contains the encoder, ...), so they do not sum to the step.

``--trace DIR``: also run the kv_cache collector (as the benchmark calls it) under `jax.profiler` and print its
XLA ops' time per call, grouped by (inside the scan or not, op kind, leading dimension): 136 = the frame pass
(N x 17 tokens), 8 = N rows (action-token steps, attention, env), 320 = the text prefix. On 2 shared cores the
two XLA threads rarely overlap, so the sum is close to the call's wall time.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import re
import statistics
import time

import bench_rollout
import jax
import jax.numpy as jnp
from flax import nnx

from gea_jax.agent.policy import candidate_ids, text_prefix_cache
from gea_jax.agent.prompt import assemble
from gea_jax.agent.rollout import decode_without_cache, make_collector, make_reset_pool, refresh_prefix_rows
from gea_jax.envs import registry
from gea_jax.eval import init_buffers, make_policy_step


def timed(f, *args, reps: int):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts) * 1e3


def profile_env(args, ctx, model, graphdef, state, mask_table, name: str) -> dict[str, float]:
  L = ctx.layout
  n = args.envs
  env = registry.make(name)
  e = ctx.index(name)
  pool = make_reset_pool(env, ctx, e, jax.random.key(1), n * 3)
  st = jax.tree.map(lambda x: x[:n], pool.states)
  spec = ctx.specs[e]
  if spec.action_space.is_continuous:
    a = jnp.zeros((n, spec.action_space.dim), jnp.float32)
  else:
    a = jnp.zeros((n,), jnp.int32)
  r = {}
  r["env_step"] = timed(jax.jit(jax.vmap(env.step)), st, a, reps=args.reps)
  if hasattr(env, "renderer"):
    ps = st.inner
    r["render"] = timed(jax.jit(jax.vmap(lambda p: env.render_state(p, None))), ps, reps=args.reps)
    ctrl = jnp.zeros((n, spec.action_space.dim), jnp.float32)
    r["physics"] = timed(jax.jit(jax.vmap(env.pipeline_step)), ps, ctrl, reps=args.reps)
  buffers = init_buffers(ctx, n)
  tok_valid = jnp.ones((n, L.action_tokens), bool)
  prompt = assemble(L, jnp, pool.text_ids[:n], pool.text_mask[:n], jnp.ones((n, L.num_frames), bool),
                    buffers.hist_ids, tok_valid)
  images = jnp.broadcast_to(st.obs["image"][:, None], (n, L.num_frames) + st.obs["image"].shape[1:])
  states = jnp.zeros((n, L.num_frames, ctx.max_state_dim), jnp.float32)

  r["vision_encoder"] = timed(jax.jit(lambda s, im: nnx.merge(graphdef, s).vlm.encode_images(im)), state, images,
                              reps=args.reps)
  prefix_fn = jax.jit(lambda s, ids, msk: text_prefix_cache(nnx.merge(graphdef, s), L, ids, msk))
  r["text_prefix"] = timed(prefix_fn, state, pool.text_ids[:n], pool.text_mask[:n], reps=args.reps)
  prefix = prefix_fn(state, pool.text_ids[:n], pool.text_mask[:n])
  s0 = L.text_len

  def frames(s, p, c):
    return nnx.merge(graphdef, s).forward(p["input_ids"][:, s0:], images, states, p["attention_mask"][:, s0:],
                                          p["positions"][:, s0:], cache=c, offset=s0, keep_last=1,
                                          text_ids=p["input_ids"][:, :s0], text_mask=p["attention_mask"][:, :s0])
  one_reset = jnp.zeros((n,), bool).at[0].set(True)
  refresh = jax.jit(lambda s, c, d, ids, msk: refresh_prefix_rows(nnx.merge(graphdef, s), L, c, d, ids, msk,
                                                                  -(-n // 4)))
  r["prefix_refresh_one_reset"] = timed(refresh, state, prefix, one_reset, pool.text_ids[n:2 * n],
                                        pool.text_mask[n:2 * n], reps=args.reps)
  r["frame_pass"] = timed(jax.jit(frames), state, prompt, prefix, reps=args.reps)
  c1 = jax.jit(frames)(state, prompt, prefix).cache

  def tok_step(s, c):
    return nnx.merge(graphdef, s).llm.forward(jnp.zeros((n, 1), jnp.int32), attention_mask=jnp.ones((n, 1), jnp.int32),
                                              cache=c, compute_logits=False)
  r["action_token_step"] = timed(jax.jit(tok_step), state, c1, reps=args.reps)

  def whole_prompt(s, p):
    mm = nnx.merge(graphdef, s)
    return mm.forward(p["input_ids"], images, states, p["attention_mask"], p["positions"],
                      cache=mm.llm.init_cache(n, L.seq_len), keep_last=1)
  r["whole_prompt_pass"] = timed(jax.jit(whole_prompt), state, prompt, reps=args.reps)
  full = assemble(L, jnp, pool.text_ids[:n], pool.text_mask[:n], jnp.ones((n, L.num_frames), bool),
                  buffers.hist_ids, tok_valid, target_action_ids=jnp.zeros((n, L.action_tokens), jnp.int32))

  def whole_seq(s, p):
    return nnx.merge(graphdef, s).forward(p["input_ids"], images, states, p["attention_mask"], p["positions"])
  r["whole_seq_pass"] = timed(jax.jit(whole_seq), state, full, reps=args.reps)
  ids = jnp.zeros((n, L.action_tokens), jnp.int32) + ctx.vocab.mask_table.argmax(-1)[e][None, :L.action_tokens]
  h1 = jnp.zeros((n, 1, model.llm.config.hidden_size), jnp.float32)
  r["logits_full_vocab"] = timed(jax.jit(lambda s, h: nnx.merge(graphdef, s).llm.lm_logits(h)), state, h1,
                                 reps=args.reps)
  cand = candidate_ids(ctx.vocab.mask_table)
  r["logits_action_ids"] = timed(jax.jit(lambda s, h: nnx.merge(graphdef, s).llm.lm_logits(h, cand)), state, h1,
                                 reps=args.reps)
  r["rvq_decode"] = timed(jax.jit(lambda i: ctx.vocab.decode(i, jnp.full((n,), e, jnp.int32))), ids, reps=args.reps)
  for variant, kw in (("kv_cache", {}), ("recompute", dict(decode_fn=decode_without_cache))):
    pol = make_policy_step(ctx, e, greedy=False, decode_fn=kw.get("decode_fn"))
    if variant == "kv_cache":
      f = jax.jit(functools.partial(lambda pol, s, *rest: pol(nnx.merge(graphdef, s), *rest), pol))
      r[f"policy_step_{variant}"] = timed(f, state, buffers, st.obs, pool.text_ids[:n], pool.text_mask[:n],
                                          jax.random.key(0), mask_table, prefix, reps=args.reps)
    else:
      f = jax.jit(functools.partial(lambda pol, s, *rest: pol(nnx.merge(graphdef, s), *rest), pol))
      r[f"policy_step_{variant}"] = timed(f, state, buffers, st.obs, pool.text_ids[:n], pool.text_mask[:n],
                                          jax.random.key(0), mask_table, reps=args.reps)
    collect = make_collector(ctx, e, env, args.steps, greedy=False, **kw)
    cf = jax.jit(lambda s, p, k, mt, collect=collect: collect(nnx.merge(graphdef, s), p, n, k, mt)[0].logp)
    r[f"collector_step_{variant}"] = timed(cf, state, pool, jax.random.key(0), mask_table,
                                           reps=max(2, args.reps // 3)) / args.steps
  return r


def op_breakdown(f, args_, trace_dir: str, calls: int = 2) -> dict[str, float]:
  """ms per call of the XLA ops of jitted ``f(*args_)``, grouped by (scan body / main, op kind, leading dim)."""
  jax.block_until_ready(f(*args_))
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      jax.block_until_ready(f(*args_))
  info = {}
  for line in f.lower(*args_).compile().as_text().splitlines():
    m = re.match(r"\s+(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
    if m:
      meta = re.search(r'op_name="([^"]*)"', line)
      info[m.group(1)] = (m.group(2), meta.group(1) if meta else m.group(3))
  events = json.load(gzip.open(sorted(glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz"))[-1]))
  out = collections.defaultdict(float)
  for ev in events["traceEvents"]:
    if ev.get("ph") != "X" or ev["name"] not in info:
      continue
    shape, op = info[ev["name"]]
    dims = re.findall(r"\[([\d,]*)\]", shape)
    kind = op.split("/")[-1]
    where = "scan" if "while/body" in op else "main"
    out[f"{where}/{kind}/{dims[0].split(',')[0] if dims else '-'}"] += ev.get("dur", 0) / 1e3 / calls
  return dict(sorted(((k, round(v, 1)) for k, v in out.items() if v >= 1.0), key=lambda kv: -kv[1]))


def main():
  ap = bench_rollout.model_arguments(argparse.ArgumentParser())
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--trace", default=None, help="directory: also print the kv_cache collector's XLA op breakdown")
  args = ap.parse_args()
  ctx, model, names = bench_rollout.build(args)
  L = ctx.layout
  graphdef, state = nnx.split(model)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  print(f"layout: text_len={L.text_len} prompt_len={L.prompt_len} seq_len={L.seq_len} frames={L.num_frames} "
        f"frame_len={L.frame_len} action slots={L.action_tokens}")
  out = {}
  for name in names:
    r = profile_env(args, ctx, model, graphdef, state, mask_table, name)
    out[name] = {k: round(v, 2) for k, v in r.items()}
    print(name, json.dumps(out[name]))
    if args.trace:
      env, e = registry.make(name), ctx.index(name)
      pool = make_reset_pool(env, ctx, e, jax.random.key(1), args.envs * 3)
      collect = make_collector(ctx, e, env, args.steps, greedy=False)

      def run(s, p, k, mt, collect=collect):  # what the benchmark times (XLA drops the unused outputs)
        traj = collect(nnx.merge(graphdef, s), p, args.envs, k, mt)[0]
        return traj.logp, jnp.sum(traj.termination | traj.truncation, axis=1)
      ops = op_breakdown(jax.jit(run), (state, pool, jax.random.key(1), mask_table), f"{args.trace}/{name}")
      print(name, "kv_cache collector, XLA op ms per call:", json.dumps(ops))
  print(json.dumps(out))


if __name__ == "__main__":
  main()
