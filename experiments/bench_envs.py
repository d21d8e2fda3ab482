"""Env-steps/s of every embodiment with pixels (64x64 RGB rendered every step), batched.

    python experiments/bench_envs.py                       # all embodiments, batch 64 and 256
    python experiments/bench_envs.py --embodiments=reacher,grid_goto --batch_sizes=256 --steps=50

Each measurement is one jitted program: `lax.scan` over `--steps` steps of `vmap(env.step)` with
uniform random actions (no auto-reset needed: a done env keeps stepping). Compilation is excluded
(one warm-up call); the best of `--repeats` timed calls is reported. As a peer, brax's own
environment step (same physics, no pixels) is timed at the largest batch for the Brax bodies, so
the cost of rendering shows as a ratio measured in the same run. The last line is JSON:
{"env_steps_per_s": {name: steps/s at the largest batch}, "by_batch": {...}, "brax_no_pixels": {...}}.
"""

from __future__ import annotations

import argparse
import json
import time

import jax


def _random_actions(spec, key, batch):
  a = spec.action_space
  if a.is_continuous:
    return jax.random.uniform(key, (batch, a.dim), minval=-1.0, maxval=1.0)
  return jax.random.randint(key, (batch,), 0, a.num_actions)


def time_program(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def bench_env(name: str, batch: int, steps: int, repeats: int) -> float:
  from gea_jax.envs import make
  env = make(name)
  keys = jax.random.split(jax.random.PRNGKey(0), batch)
  state = jax.jit(jax.vmap(env.reset))(keys)

  @jax.jit
  def run(state, key):
    def body(s, k):
      s = jax.vmap(env.step)(s, _random_actions(env.spec, k, batch))
      return s, s.obs["image"][:, 0, 0, 0]  # keep the images live
    return jax.lax.scan(body, state, jax.random.split(key, steps))

  dt = time_program(run, (state, jax.random.PRNGKey(1)), repeats)
  return batch * steps / dt


def bench_brax_peer(name: str, batch: int, steps: int, repeats: int) -> float:
  from gea_jax.envs.brax_body import load_brax_env
  env = load_brax_env(name)
  state = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.PRNGKey(0), batch))

  @jax.jit
  def run(state, key):
    def body(s, k):
      return jax.vmap(env.step)(s, jax.random.uniform(k, (batch, env.action_size), minval=-1, maxval=1)), None
    return jax.lax.scan(body, state, jax.random.split(key, steps))

  return batch * steps / time_program(run, (state, jax.random.PRNGKey(1)), repeats)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--embodiments", default="all", help="comma-separated names, or 'all'")
  p.add_argument("--batch_sizes", default="64,256")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--no_peer", action="store_true", help="skip brax's own (pixel-free) env step")
  args = p.parse_args()
  from gea_jax.envs import names
  todo = list(names()) if args.embodiments == "all" else args.embodiments.split(",")
  batches = [int(b) for b in args.batch_sizes.split(",")]
  by_batch: dict[str, dict[str, float]] = {}
  peer: dict[str, float] = {}
  for name in todo:
    by_batch[name] = {}
    for b in batches:
      t0 = time.perf_counter()
      sps = bench_env(name, b, args.steps, args.repeats)
      by_batch[name][str(b)] = round(sps, 1)
      print(f"{name:14s} batch {b:4d}: {sps:10.1f} env-steps/s with pixels  ({time.perf_counter() - t0:.0f}s incl. compile)",
            flush=True)
    if not args.no_peer and name in ("reacher", "pusher", "halfcheetah"):
      b = max(batches)
      peer[name] = round(bench_brax_peer(name, b, args.steps, args.repeats), 1)
      ratio = by_batch[name][str(b)] / peer[name]
      print(f"{name:14s} batch {b:4d}: {peer[name]:10.1f} env-steps/s brax env, no pixels "
            f"(with pixels / without = {ratio:.2f})", flush=True)
  top = str(max(batches))
  print(json.dumps({"env_steps_per_s": {n: v[top] for n, v in by_batch.items()}, "batch_size": int(top),
                    "by_batch": by_batch, "brax_no_pixels": peer}))


if __name__ == "__main__":
  main()
