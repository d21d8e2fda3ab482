"""Builds the expert-demonstration datasets: one TFDS dataset (RLDS episodes, array_record) per embodiment.

  python -m data_pipelines.build --embodiments=reacher,grid_goto --episodes=200 --data_dir=/tmp/gea_data

writes DATA_DIR/gea_episodes/<embodiment>/1.0.0/ with a train split of `--episodes` episodes and, for each
held-out task split the embodiment has (heldout_seed; heldout_combo for grid tasks), `--heldout_episodes`
episodes; normalization statistics of the train split are saved beside the data. Each embodiment's
dataset appears atomically (TFDS renames its incomplete dir when done); an existing one is kept unless
`--overwrite`. Episodes come from `data_pipelines.experts.rollout(name, num_episodes, seed, task_split)`,
asked for in chunks of `--chunk` so that the progress bar moves and memory stays bounded.
`--action_noise=reacher=0.3,grid_goto=0.2` makes the train split's demonstrations DART-style (the env executes the
expert's action plus Gaussian noise of std 0.3 for continuous actions, a random move with probability 0.2 for discrete
ones; the episode records the expert's clean action; held-out splits stay noise-free); the noise is
recorded in the dataset's build_args, and keeping an existing dataset built with another noise is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from data_pipelines.rlds_builder import SPLITS, build_dataset, dataset_path, read_json

RolloutFn = Callable[[str, int, int, str], Sequence[dict[str, Any]]]


def chunk_seed(seed: int, chunk_index: int, chunk: int) -> int:
  """Seed of the `chunk_index`-th rollout call: episode i of `rollout(name, n, s)` resets with
  PRNGKey(s + i), so episode j of a split is the one with seed `seed + j` whatever the chunk size."""
  return seed + chunk_index * chunk


def chunked_episodes(rollout: RolloutFn, name: str, chunk: int) -> Callable[[str, int, int], Iterator[dict]]:
  """Adapts `rollout(name, n, seed, task_split)` to the builder's `episodes_fn(split, n, seed)`."""

  def episodes_fn(split: str, n: int, seed: int) -> Iterator[dict]:
    produced, c = 0, 0
    while produced < n:
      # A fixed request size per split (one compilation); seeds stay seed + j whatever the size.
      eps = rollout(name, min(chunk, n), chunk_seed(seed, c, min(chunk, n)), split)
      if len(eps) == 0:
        raise RuntimeError(f"expert rollout for {name!r}/{split} returned no episodes")
      for ep in eps[: n - produced]:
        yield ep
        produced += 1
      c += 1

  return episodes_fn


def _default_rollout() -> RolloutFn:
  from data_pipelines import experts

  if not hasattr(experts, "rollout"):
    raise RuntimeError("data_pipelines.experts has no rollout(name, num_episodes, seed, task_split) yet")
  return experts.rollout


def parse_action_noise(spec: str) -> dict[str, float]:
  """"reacher=0.3,grid_goto=0.2" -> {"reacher": 0.3, "grid_goto": 0.2} (executed-action noise: a std for continuous
  actions, a probability for discrete ones; `data_pipelines.experts.rollout`)."""
  out: dict[str, float] = {}
  for item in (x.strip() for x in str(spec or "").split(",") if x.strip()):
    name, sep, value = item.partition("=")
    try:
      noise = float(value) if sep else -1.0
    except ValueError:
      noise = -1.0
    if not name.strip() or noise < 0:
      raise ValueError(f"action_noise: expected 'embodiment=noise' entries (noise >= 0) separated by commas, got {item!r}")
    out[name.strip()] = noise
  return out


def _noisy(rollout: RolloutFn, noise: float) -> RolloutFn:
  """`rollout` with DART noise on the train split only (held-out splits are clean references)."""
  if noise <= 0:
    return rollout
  return lambda name, n, seed, split: rollout(name, n, seed, split, action_noise=noise if split == "train" else 0.0)


def build(embodiments: Sequence[str], episodes: int, data_dir: str, *, seed: int = 0, heldout_episodes: int | None = None,
          splits: Sequence[str] | None = None, chunk: int = 32, overwrite: bool = False, progress: bool = True,
          rollout: RolloutFn | None = None, action_noise: dict[str, float] | None = None) -> dict[str, Any]:
  """Builds one dataset per embodiment; returns a summary (paths, episode counts, expert success rates).

  action_noise: embodiment -> std of the train split's executed-action noise (`parse_action_noise`).
  """
  import tensorflow_datasets as tfds

  from gea_jax.envs import registry

  tfds.disable_progress_bar()  # our own tqdm bar counts episodes with an ETA
  known = registry.names()
  unknown = [e for e in embodiments if e not in known]
  if unknown:
    raise ValueError(f"--embodiments: unknown embodiment(s) {unknown}; known: {', '.join(known)}")
  if episodes <= 0:
    raise ValueError(f"--episodes must be > 0, got {episodes}")
  if splits is not None:
    bad = [s for s in splits if s not in SPLITS]
    if bad:
      raise ValueError(f"--splits: unknown split(s) {bad}; expected some of {list(SPLITS)}")
  heldout_episodes = max(1, episodes // 10) if heldout_episodes is None else heldout_episodes
  action_noise = dict(action_noise or {})
  stray = [e for e in action_noise if e not in embodiments]
  if stray:
    raise ValueError(f"--action_noise: {stray} not among the embodiments being built {list(embodiments)}")
  rollout = rollout or _default_rollout()
  summary: dict[str, Any] = {}
  for name in embodiments:
    emb = registry.make(name)
    emb_splits = [s for s in getattr(emb, "task_splits", ("train",)) if splits is None or s in splits]
    if splits is not None and "train" in splits and "train" not in emb_splits:
      emb_splits.insert(0, "train")
    counts = {s: (episodes if s == "train" else heldout_episodes) for s in emb_splits}
    counts = {s: n for s, n in counts.items() if n > 0}
    noise = float(action_noise.get(name, 0.0))
    if dataset_path(data_dir, name).exists() and not overwrite:
      built = read_json(dataset_path(data_dir, name) / "metadata.json", "metadata.json").get("build_args", {})
      if float(built.get("action_noise", 0.0)) != noise:
        raise ValueError(f"{dataset_path(data_dir, name)} was built with action_noise={built.get('action_noise', 0.0)}, "
                         f"this build asks for {noise}: pass --overwrite or another data_dir")
      print(f"{name}: {dataset_path(data_dir, name)} exists, kept (pass --overwrite to rebuild)", file=sys.stderr)
      summary[name] = {"path": str(dataset_path(data_dir, name)), "kept": True}
      continue
    t0 = time.time()
    args = {"chunk": chunk, **({"action_noise": noise} if noise > 0 else {})}
    path = build_dataset(data_dir, emb.spec, chunked_episodes(_noisy(rollout, noise), name, chunk), counts, seed=seed,
                         build_args=args, progress=progress, overwrite=overwrite)
    meta = json.loads((path / "metadata.json").read_text())
    summary[name] = {"path": str(path), "episodes": counts, "steps": {s: int(sum(v)) for s, v in meta["episode_lengths"].items()},
                     "expert_success_rate": meta["expert_success_rate"], "seconds": round(time.time() - t0, 1)}
  return summary


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="python -m data_pipelines.build", description=__doc__.split("\n\n")[0])
  p.add_argument("--embodiments", required=True, help="comma-separated embodiment names (gea_jax.envs.registry)")
  p.add_argument("--episodes", type=int, required=True, help="train episodes per embodiment")
  p.add_argument("--data_dir", required=True)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--heldout_episodes", type=int, default=None, help="episodes per held-out split (default episodes//10)")
  p.add_argument("--splits", "--split", default=None,
                 help=f"comma-separated subset of {','.join(SPLITS)} (default: every split the embodiment has)")
  p.add_argument("--chunk", type=int, default=32, help="episodes per expert rollout call (32: the rollout batch, no padding)")
  p.add_argument("--action_noise", default="", help="DART demonstrations: 'embodiment=noise,...' (train split only; a std for continuous actions, "
                 "a probability of a random move for discrete ones)")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--no_progress", action="store_true")
  a = p.parse_args(argv)
  embodiments = [e for e in a.embodiments.split(",") if e]
  splits = [s for s in a.splits.split(",") if s] if a.splits else None
  try:
    summary = build(embodiments, a.episodes, a.data_dir, seed=a.seed, heldout_episodes=a.heldout_episodes,
                    splits=splits, chunk=a.chunk, overwrite=a.overwrite, progress=not a.no_progress,
                    action_noise=parse_action_noise(a.action_noise))
  except (ValueError, FileExistsError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main())
