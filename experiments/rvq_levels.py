"""RVQ levels x codebook size on the experts' actions, against uniform binning; expert success through the tokenizer.

    .venv/bin/python experiments/rvq_levels.py [--steps=3000] [--episodes=96] [--success_episodes=512]

For every continuous embodiment that has an expert (``data_pipelines.experts``), expert rollouts give
training actions (seeds 0..episodes-1) and held-out actions (other seeds). One multi-embodiment
tokenizer is trained per (L, K) in {1,2,3,4} x {64,256,512}; its normalized reconstruction MSE
(MSE / variance of the normalized actions, through vocab encode -> decode, i.e. de-normalized and
clipped) is compared with uniform per-dimension binning at the same number of tokens per action:
L tokens of K ids carry K^L codes, so each of the d dimensions gets floor(K^(L/d)) uniform bins over
the training range (a mixed-radix code over the dimensions). Then the expert is rolled out with its
actions passed through encode -> decode of the L=2, K=512 tokenizer, against the raw expert on the
same seeds. Embodiments without an expert are reported as missing, not estimated.

Prints a markdown table and, as its last line, JSON with ``nmse_L2_K512`` and ``success_drop_L2_K512``
(worst embodiment; percentage points).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from data_pipelines import experts  # noqa: E402
from gea_jax.envs import registry  # noqa: E402
from gea_jax.train import tokenizer as trainer  # noqa: E402

LEVELS = (1, 2, 3, 4)
SIZES = (64, 256, 512)
CONTINUOUS_BODIES = ("reacher", "pusher", "halfcheetah")


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def config_for(levels: int, size: int, steps: int, seed: int) -> ml_collections.ConfigDict:
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "rvq.py")
  spec = importlib.util.spec_from_file_location("rvq_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.rvq.num_levels, c.rvq.codebook_size = levels, size
  c.train.steps, c.train.seed, c.train.log_every = steps, seed, max(1, steps // 5)
  c.train.batch_size = 1024
  c.mesh.shape = (-1, 1, 1)
  return c


def expert_actions(name: str, episodes: int, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
  """(actions [N, d], episode_starts [N], success rate) of expert rollouts, final zero actions dropped."""
  eps = experts.rollout(name, episodes, seed, "train")
  acts = [np.asarray(e["action"], np.float32)[~np.asarray(e["is_last"])] for e in eps]
  starts = [np.arange(len(a)) == 0 for a in acts]
  return np.concatenate(acts), np.concatenate(starts), float(np.mean([e["success"] for e in eps]))


def binning_nmse(train: np.ndarray, test: np.ndarray, levels: int, size: int) -> tuple[float, int]:
  """Uniform per-dimension binning with K^L codes in total; NMSE in z-scored units; bins per dimension."""
  d = train.shape[1]
  bins = max(1, int(np.floor(size ** (levels / d) + 1e-9)))
  lo, hi = train.min(0), train.max(0)
  width = np.where(hi > lo, (hi - lo) / bins, 1.0)
  idx = np.clip(np.floor((test - lo) / width), 0, bins - 1)
  recon = lo + (idx + 0.5) * width
  recon = np.where(hi > lo, recon, lo)
  mean, std = train.mean(0), np.where(train.std(0) < 1e-6, 1.0, train.std(0))
  x, xh = (test - mean) / std, (recon - mean) / std
  return float(np.mean((xh - x) ** 2) / max(np.mean(np.var(x, 0)), 1e-12)), bins


def success_through(vocab, name: str, episodes: int, seed: int) -> float:
  """Expert success when every action goes through vocab encode -> decode (same seeds as the raw run)."""
  base = experts.get(name)
  dim = vocab.action_dim(name)

  def act(state, key):
    a = base.act(state, key)
    ids = vocab.encode(a[None, None, :], name)
    return vocab.decode(ids, name)[0, 0, :dim]

  wrapped = dataclasses.replace(base, name=base.name + "+rvq", act=act)
  return experts.success_rate(name, episodes, seed, "train", expert=wrapped, batch_size=128)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=3000,
                 help="training steps per tokenizer (configs/rvq.py's default; K=512 codebooks are under-trained at 1000)")
  p.add_argument("--episodes", type=int, default=96, help="expert episodes per body for training")
  p.add_argument("--eval_episodes", type=int, default=32, help="held-out expert episodes per body for NMSE")
  p.add_argument("--success_episodes", type=int, default=512,
                 help="paired episodes per body for the success test (same seeds raw and tokenized)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--levels", default=",".join(map(str, LEVELS)), help="comma-separated L values (must include 2)")
  p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated K values (must include 512)")
  args = p.parse_args()
  levels = tuple(int(x) for x in args.levels.split(","))
  sizes = tuple(int(x) for x in args.sizes.split(","))
  if 2 not in levels or 512 not in sizes:
    raise SystemExit("rvq_levels: --levels must include 2 and --sizes must include 512 (the headline setting)")
  t0 = time.time()

  bodies, missing = [], {}
  for name in CONTINUOUS_BODIES:
    if name not in registry.names():
      missing[name] = "not in the embodiment registry"
      continue
    try:
      experts.get(name)
      bodies.append(name)
    except (KeyError, ImportError, AttributeError) as e:
      missing[name] = f"no expert registered ({type(e).__name__})"
  if not bodies:
    raise SystemExit("rvq_levels: no continuous embodiment has an expert; nothing to measure")
  for name, why in missing.items():
    log(f"[missing] {name}: {why}")

  sources, test, raw_success = {}, {}, {}
  for name in bodies:
    log(f"[data] {name}: {args.episodes} training + {args.eval_episodes} held-out expert episodes")
    a, starts, _ = expert_actions(name, args.episodes, args.seed)
    sources[name] = trainer.ActionSource(registry.make(name).spec, a, episode_starts=starts)
    test[name], _, _ = expert_actions(name, args.eval_episodes, args.seed + 100_000)
    log(f"[data] {name}: {len(a)} training actions, {len(test[name])} held-out, dim {a.shape[1]}")

  rows, nmse, keep = [], {}, None
  for lv in levels:
    for k in sizes:
      t = time.time()
      result = trainer.train(config_for(lv, k, args.steps, args.seed), sources, progress=False)
      for name in bodies:
        e = result.vocab.embodiment_index(name)
        nmse[(lv, k, name)] = trainer.nmse_through_vocab(result.vocab, test[name][:, None], e)
        b_nmse, bins = binning_nmse(sources[name].actions, test[name], lv, k)
        rows.append({"L": lv, "K": k, "body": name, "dim": test[name].shape[1], "rvq": nmse[(lv, k, name)],
                     "binning": b_nmse, "bins/dim": bins})
      log(f"[rvq] L={lv} K={k}: " + ", ".join(f"{n} nmse={nmse[(lv, k, n)]:.4g}" for n in bodies)
          + f" ({time.time() - t:.0f}s)")
      if (lv, k) == (2, 512):
        keep = result

  success = {}
  for name in bodies:
    log(f"[success] {name}: {args.success_episodes} episodes raw and through L=2 K=512")
    raw = experts.success_rate(name, args.success_episodes, args.seed + 200_000, "train", batch_size=128)
    tok = success_through(keep.vocab, name, args.success_episodes, args.seed + 200_000)
    success[name] = {"raw": raw, "rvq": tok, "drop_points": 100.0 * (raw - tok)}
    raw_success[name] = raw

  print("## NMSE (held-out expert actions; MSE / variance of the normalized actions)\n")
  print("| L | K | tokens/action | " + " | ".join(f"{n} rvq | {n} binning (bins/dim)" for n in bodies) + " |")
  print("|---|---|---|" + "---|---|" * len(bodies))
  for lv in levels:
    for k in sizes:
      cells = []
      for n in bodies:
        r = next(r for r in rows if (r["L"], r["K"], r["body"]) == (lv, k, n))
        cells.append(f"{r['rvq']:.2e} | {r['binning']:.2e} ({r['bins/dim']})")
      print(f"| {lv} | {k} | {lv} | " + " | ".join(cells) + " |")
  print("\n## Expert success, raw vs actions through encode -> decode (L=2, K=512)\n")
  print("| body | episodes | raw | through RVQ | drop (points) |")
  print("|---|---|---|---|---|")
  for n, s in success.items():
    print(f"| {n} | {args.success_episodes} | {100 * s['raw']:.1f}% | {100 * s['rvq']:.1f}% | {s['drop_points']:.1f} |")
  for n, why in missing.items():
    print(f"| {n} | - | missing: {why} | | |")
  print()
  out = {
      "nmse_L2_K512": max(nmse[(2, 512, n)] for n in bodies),
      "success_drop_L2_K512": max(s["drop_points"] for s in success.values()),
      "nmse_L2_K512_by_body": {n: nmse[(2, 512, n)] for n in bodies},
      "binning_nmse_L2_K512_by_body": {r["body"]: r["binning"] for r in rows if (r["L"], r["K"]) == (2, 512)},
      "success_L2_K512": success,
      "grid": rows,
      "bodies": bodies, "missing": sorted(missing),
      "steps": args.steps, "episodes": args.episodes, "wall_seconds": round(time.time() - t0, 1),
      "devices": jax.device_count(),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
