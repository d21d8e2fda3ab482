"""Our PPO vs Brax's own PPO trainer: wall time to a reward threshold on Brax envs (issue 6 benchmark).

  .venv/bin/python experiments/bench_ppo_vs_brax.py [--envs inverted_pendulum,reacher]

Brax's trainer does not run on our jax (0.10.2), so it runs in ``.venv-brax`` (jax 0.8.3, brax 0.14.2;
created by ``experiments/brax_peer/setup.sh`` if missing). Each side runs in a fresh subprocess of this
script (``--worker ours|brax``) with the same env (positional backend), number of envs, PPO hyperparameters
and network sizes, one after the other on the same machine.

Measured, identically on both sides:
- wall time from the start of training (env reset and compilation included) until the mean return of the
  last >= 100 finished training episodes reaches the threshold (Brax: ``run_evals=False,
  log_training_metrics=True``, whose logger averages the last 100 episodes; no eval rollouts on either side);
- compile time: sum of jax's trace + lower + XLA-compile durations (``jax.monitoring`` events);
- env-steps/s: env steps to the threshold / (wall time - compile time).
Last line: JSON with ``ratio_vs_brax`` (Brax's wall time / ours, inverted_pendulum) and per-env figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared hyperparameters (Brax ``ppo.train`` names). Networks: Brax's defaults for PPO, passed to both sides.
SETTINGS = {
    "inverted_pendulum": dict(
        threshold=950.0, max_env_steps=3_000_000, num_envs=256, batch_size=256, num_minibatches=8,
        unroll_length=5, num_updates_per_batch=4, discounting=0.97, learning_rate=3e-4, entropy_cost=1e-2,
        reward_scaling=10.0, episode_length=1000, action_repeat=1, gae_lambda=0.95, clipping_epsilon=0.3,
        policy_hidden=(32, 32, 32, 32), value_hidden=(256, 256, 256, 256, 256)),
    "reacher": dict(
        threshold=-200.0, max_env_steps=4_000_000, num_envs=256, batch_size=256, num_minibatches=8,
        unroll_length=10, num_updates_per_batch=4, discounting=0.95, learning_rate=1e-3, entropy_cost=1e-3,
        reward_scaling=5.0, episode_length=1000, action_repeat=4, gae_lambda=0.95, clipping_epsilon=0.3,
        policy_hidden=(32, 32, 32, 32), value_hidden=(256, 256, 256, 256, 256)),
}
ITERATIONS_PER_CALL = 4  # ours: PPO iterations per jitted call
BRAX_NUM_EVALS = 40  # brax: number of host-side epochs over max_env_steps (no evals are run)


class _CompileClock:
  """Sums jax's compile-phase durations (trace, lower to MLIR, XLA compile) reported via jax.monitoring."""

  EVENTS = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration")

  def __init__(self):
    import jax
    self.total = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on)

  def _on(self, event, duration, **_):
    if any(event.endswith(e) for e in self.EVENTS):
      self.total += duration


class _Reached(Exception):
  pass


def _result(t0, clock, reached_step, reached_t, steps, curve, final):
  wall = reached_t if reached_t is not None else time.time() - t0
  n = reached_step if reached_step is not None else steps
  return {"reached": reached_step is not None, "wall_s": wall, "env_steps": n, "compile_s": clock.total,
          "env_steps_per_s": n / max(wall - clock.total, 1e-9), "final_return": final, "curve": curve[-200:]}


def worker_ours(env_name: str, seed: int) -> dict:
  import jax

  from gea_jax.rl.brax_env import BraxVecEnv, make_brax_env
  from gea_jax.rl.networks import ActorCritic
  from gea_jax.rl.ppo import PPO, PPOConfig
  p = SETTINGS[env_name]
  clock = _CompileClock()
  cfg = PPOConfig(num_envs=p["num_envs"], unroll_length=p["unroll_length"], batch_size=p["batch_size"],
                  num_minibatches=p["num_minibatches"], num_epochs=p["num_updates_per_batch"],
                  learning_rate=p["learning_rate"], entropy_coef=p["entropy_cost"], discount=p["discounting"],
                  gae_lambda=p["gae_lambda"], clip_eps=p["clipping_epsilon"], reward_scaling=p["reward_scaling"],
                  normalize_observations=True, iterations_per_call=ITERATIONS_PER_CALL)
  env = BraxVecEnv(make_brax_env(env_name, "positional"), p["num_envs"], p["episode_length"], p["action_repeat"])
  ppo = PPO(cfg, env, lambda r: ActorCritic(env.observation_size, env.action_size, policy_hidden=p["policy_hidden"],
                                            value_hidden=p["value_hidden"], rngs=r))
  per_call = ppo.env_steps_per_iteration * cfg.iterations_per_call
  t0 = time.time()
  state = ppo.init(jax.random.key(seed))
  window: list[tuple[float, float]] = []  # (return sum, episodes) per call, newest last
  curve, steps, reached_step, reached_t, final = [], 0, None, None, None
  while steps < p["max_env_steps"]:
    state, m = ppo.train_step(state)
    m = jax.device_get(m)
    steps += per_call
    window.append((float(m["episode_return_sum"]), float(m["episodes"])))
    # mean over the most recent calls holding >= 100 finished episodes (Brax's logger: last 100 episodes)
    tot, cnt = 0.0, 0.0
    for s, c in reversed(window):
      tot, cnt = tot + s, cnt + c
      if cnt >= 100:
        break
    if cnt >= 100:
      final = tot / cnt
      curve.append((steps, round(time.time() - t0, 2), round(final, 2)))
      print(f"ours {env_name}: {curve[-1]}", file=sys.stderr, flush=True)
      if final >= p["threshold"]:
        reached_step, reached_t = steps, time.time() - t0
        break
  return _result(t0, clock, reached_step, reached_t, steps, curve, final)


def worker_brax(env_name: str, seed: int) -> dict:
  import functools

  import jax
  from brax import envs
  from brax.training.agents.ppo import networks as ppo_networks
  from brax.training.agents.ppo import train as ppo
  p = SETTINGS[env_name]
  clock = _CompileClock()
  env = envs.get_environment(env_name, backend="positional")
  net = functools.partial(ppo_networks.make_ppo_networks, policy_hidden_layer_sizes=p["policy_hidden"],
                          value_hidden_layer_sizes=p["value_hidden"])
  curve, box = [], {"step": None, "t": None, "final": None, "steps": 0}

  def progress(step, metrics):
    r = metrics.get("episode/sum_reward")
    if r is None:  # the end-of-epoch call (env steps, no episode metrics)
      return
    step = int(step) * p["action_repeat"]  # Brax's training logger counts agent steps, not env steps
    box["steps"] = step
    box["final"] = float(r)
    curve.append((int(step), round(time.time() - t0, 2), round(float(r), 2)))
    print(f"brax {env_name}: {curve[-1]}", file=sys.stderr, flush=True)
    if float(r) >= p["threshold"] and box["step"] is None:
      box["step"], box["t"] = int(step), time.time() - t0
      raise _Reached()

  t0 = time.time()
  try:
    ppo.train(environment=env, num_timesteps=p["max_env_steps"], num_evals=BRAX_NUM_EVALS, run_evals=False,
              log_training_metrics=True, num_envs=p["num_envs"], batch_size=p["batch_size"],
              num_minibatches=p["num_minibatches"], unroll_length=p["unroll_length"],
              num_updates_per_batch=p["num_updates_per_batch"], discounting=p["discounting"],
              learning_rate=p["learning_rate"], entropy_cost=p["entropy_cost"], reward_scaling=p["reward_scaling"],
              episode_length=p["episode_length"], action_repeat=p["action_repeat"], gae_lambda=p["gae_lambda"],
              clipping_epsilon=p["clipping_epsilon"], normalize_observations=True, network_factory=net, seed=seed,
              progress_fn=progress)
  except Exception:  # _Reached surfaces wrapped by jax's callback machinery
    if box["step"] is None:
      raise
  del jax
  return _result(t0, clock, box["step"], box["t"], box["steps"], curve, box["final"])


def _run_worker(python: str, side: str, env_name: str, seed: int, timeout: float) -> dict:
  cmd = [python, os.path.abspath(__file__), "--worker", side, "--env", env_name, "--seed", str(seed)]
  envvars = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  envvars.pop("XLA_FLAGS", None)
  t = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=envvars, timeout=timeout, cwd=ROOT)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
    raise RuntimeError(f"{side} worker on {env_name} failed (exit {proc.returncode}):\n{tail}")
  out = json.loads(lines[-1][len("RESULT "):])
  out["process_s"] = time.time() - t
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--envs", default="inverted_pendulum,reacher")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--worker", choices=("ours", "brax"))
  ap.add_argument("--env")
  ap.add_argument("--timeout", type=float, default=1800.0)
  ap.add_argument("--brax-python", default=os.path.join(ROOT, ".venv-brax", "bin", "python"))
  args = ap.parse_args()

  if args.worker:
    fn = worker_ours if args.worker == "ours" else worker_brax
    print("RESULT " + json.dumps(fn(args.env, args.seed)), flush=True)
    return

  if not os.path.exists(args.brax_python):
    subprocess.run(["bash", os.path.join(ROOT, "experiments", "brax_peer", "setup.sh")], check=True)
  env_names = [e for e in args.envs.split(",") if e]
  for e in env_names:
    if e not in SETTINGS:
      sys.exit(f"--envs: unknown env {e!r}; expected some of {sorted(SETTINGS)}")
  results: dict[str, dict] = {}
  for e in env_names:
    results[e] = {}
    for side, py in (("ours", sys.executable), ("brax", args.brax_python)):
      print(f"[{e}] running {side} ...", file=sys.stderr, flush=True)
      r = _run_worker(py, side, e, args.seed, args.timeout)
      results[e][side] = r
      print(f"[{e}] {side}: reached={r['reached']} wall={r['wall_s']:.1f}s compile={r['compile_s']:.1f}s "
            f"steps={r['env_steps']} sps={r['env_steps_per_s']:.0f} last={r['final_return']}", file=sys.stderr,
            flush=True)

  print(f"{'env':<18} {'side':<5} {'reached':>7} {'wall_s':>8} {'compile_s':>9} {'env_steps':>10} "
        f"{'steps/s':>9} {'return':>8}")
  summary = {}
  for e, sides in results.items():
    for side, r in sides.items():
      ret = "nan" if r["final_return"] is None else f"{r['final_return']:.1f}"
      print(f"{e:<18} {side:<5} {str(r['reached']):>7} {r['wall_s']:8.1f} {r['compile_s']:9.1f} "
            f"{r['env_steps']:>10} {r['env_steps_per_s']:9.0f} {ret:>8}")
    o, b = sides["ours"], sides["brax"]
    both = o["reached"] and b["reached"]
    summary[e] = {
        "threshold": SETTINGS[e]["threshold"], "ours_reached": o["reached"], "brax_reached": b["reached"],
        "ours_wall_s": round(o["wall_s"], 2), "brax_wall_s": round(b["wall_s"], 2),
        "ours_compile_s": round(o["compile_s"], 2), "brax_compile_s": round(b["compile_s"], 2),
        "ours_env_steps": o["env_steps"], "brax_env_steps": b["env_steps"],
        "ours_env_steps_per_s": round(o["env_steps_per_s"]), "brax_env_steps_per_s": round(b["env_steps_per_s"]),
        "ratio_vs_brax": round(b["wall_s"] / o["wall_s"], 3) if both else None,
        "ratio_excl_compile": round((b["wall_s"] - b["compile_s"]) / (o["wall_s"] - o["compile_s"]), 3)
        if both else None,
        "sps_ratio": round(o["env_steps_per_s"] / b["env_steps_per_s"], 3),
    }
  head = summary.get("inverted_pendulum", next(iter(summary.values())))
  print(json.dumps({"ratio_vs_brax": head["ratio_vs_brax"], "per_env": summary,
                    "note": "2 shared CPU cores; sequential runs; ratios from one run"}))


if __name__ == "__main__":
  main()
