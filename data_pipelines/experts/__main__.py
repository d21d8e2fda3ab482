"""Measures every expert's success rate: `python -m data_pipelines.experts --episodes=64`.

Prints one line per (embodiment, split) and, as the last line, JSON
{"expert_success_rate": {embodiment: {split: rate}}, "episodes": N}.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from data_pipelines.experts import get, names, rollout
from gea_jax.envs import make


def main():
  p = argparse.ArgumentParser(description="expert success rates")
  p.add_argument("--embodiments", default="all")
  p.add_argument("--episodes", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--batch_size", type=int, default=32)
  args = p.parse_args()
  todo = list(names()) if args.embodiments == "all" else args.embodiments.split(",")
  rates: dict[str, dict[str, float]] = {}
  for name in todo:
    expert = get(name)
    env = make(name)
    rates[name] = {}
    for split in [s for s in ("train", "heldout_seed", "heldout_combo") if s in env.task_splits]:
      t = time.perf_counter()
      eps = rollout(name, args.episodes, args.seed, split, batch_size=args.batch_size)
      rate = float(np.mean([e["success"] for e in eps]))
      length = float(np.mean([len(e["reward"]) - 1 for e in eps]))
      rates[name][split] = round(rate, 4)
      print(f"{name:14s} {expert.name:12s} {split:14s} success {rate:6.1%}  mean length {length:5.1f}  "
            f"({time.perf_counter() - t:.0f}s)", flush=True)
  print(json.dumps({"expert_success_rate": rates, "episodes": args.episodes}))


if __name__ == "__main__":
  main()
