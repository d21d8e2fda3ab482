"""Benchmark: samples/s of the grain input pipeline, against what one SFT step consumes.

  .venv/bin/python experiments/bench_pipeline.py --data_dir=/tmp/gea_bench_data --num_workers=2

Builds the datasets with the real experts when they are missing (`--embodiments`, `--episodes`), then
times the pipeline of `data_pipelines.pipeline.make_train_iterator` (mixture, history window,
standardization, default pass-through tokenization, batching) in this process and with `--num_workers`
worker processes. Timing starts after `--warmup_batches` (worker start-up and the first episode reads are
excluded) and counts `--batches` batches.

The trainer side is `trainer_samples_per_s()`: the samples/s one SFT step of the default config consumes.
The SFT stage does not exist yet, so it returns None unless `gea_jax.train.sft` provides
`samples_per_second()` or a number is passed with `--trainer_samples_per_s`; `headroom` is
pipeline / trainer (goal >= 5). The last line printed is one JSON object with pipeline_samples_per_s,
trainer_samples_per_s, headroom and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_pipelines import pipeline as pl  # noqa: E402
from data_pipelines import rlds_builder as rb  # noqa: E402


def trainer_samples_per_s() -> float | None:
  """Samples/s consumed by one SFT training step of configs/default.py, or None while unmeasurable.

  Plug-in point for the SFT stage: when `gea_jax.train.sft` defines `samples_per_second() -> float`
  (timing a compiled train step of the default config, in samples per second), it is used here.
  """
  try:
    from gea_jax.train import sft  # noqa: PLC0415
  except ImportError:
    return None
  fn = getattr(sft, "samples_per_second", None)
  return float(fn()) if callable(fn) else None


def headroom(pipeline_samples_per_s: float, trainer: float | None) -> float | None:
  """How many times faster the pipeline produces samples than the trainer consumes them (goal >= 5)."""
  if trainer is None or trainer <= 0:
    return None
  return pipeline_samples_per_s / trainer


def ensure_datasets(data_dir: str, embodiments: list[str], episodes: int, seed: int) -> None:
  missing = [e for e in embodiments if not rb.dataset_path(data_dir, e).exists()]
  if missing:
    from data_pipelines import build

    print(f"building datasets {missing} in {data_dir} ({episodes} episodes each)", file=sys.stderr)
    build.build(missing, episodes, data_dir, seed=seed, heldout_episodes=0, splits=["train"])


def measure(data_dir: str, embodiments: list[str], *, batch_size: int, num_workers: int, warmup_batches: int,
            batches: int, history: int, seed: int, cache_mb: int) -> dict:
  """Samples/s of the training iterator after `warmup_batches`, over `batches` batches."""
  it = pl.make_train_iterator(data_dir, embodiments, batch_size=batch_size, history=history, seed=seed,
                              shard_index=0, shard_count=1, num_workers=num_workers, cache_mb=cache_mb)
  try:
    t0 = time.perf_counter()
    for _ in range(warmup_batches):
      next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
      n += len(next(it)["embodiment_id"])
    t2 = time.perf_counter()
  finally:
    if hasattr(it, "close"):
      it.close()
  return {"num_workers": num_workers, "samples": n, "seconds": round(t2 - t1, 3),
          "warmup_seconds": round(t1 - t0, 3), "samples_per_s": n / (t2 - t1)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data_dir", default="/tmp/gea_bench_data")
  p.add_argument("--embodiments", default="reacher,grid_goto")
  p.add_argument("--episodes", type=int, default=32, help="train episodes per embodiment if a dataset is built")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--num_workers", type=int, default=2)
  p.add_argument("--warmup_batches", type=int, default=20)
  p.add_argument("--batches", type=int, default=300)
  p.add_argument("--history", type=int, default=3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cache_mb", type=int, default=256,
                 help="decoded-episode cache per process; 0 keeps only the last decoded episode (worst case)")
  p.add_argument("--trainer_samples_per_s", type=float, default=None,
                 help="the SFT step's consumption rate, if measured elsewhere")
  a = p.parse_args(argv)
  embodiments = [e for e in a.embodiments.split(",") if e]
  ensure_datasets(a.data_dir, embodiments, a.episodes, a.seed)
  common = dict(batch_size=a.batch_size, warmup_batches=a.warmup_batches, batches=a.batches, history=a.history,
                seed=a.seed, cache_mb=a.cache_mb)
  runs = [measure(a.data_dir, embodiments, num_workers=0, **common)]
  if a.num_workers > 0:
    runs.append(measure(a.data_dir, embodiments, num_workers=a.num_workers, **common))
  for r in runs:
    print(f"num_workers={r['num_workers']}: {r['samples_per_s']:.1f} samples/s "
          f"({r['samples']} samples in {r['seconds']} s; warm-up {r['warmup_seconds']} s)", file=sys.stderr)
  pipeline_sps = runs[-1]["samples_per_s"]
  trainer = a.trainer_samples_per_s if a.trainer_samples_per_s is not None else trainer_samples_per_s()
  hr = headroom(pipeline_sps, trainer)
  result = {
      "pipeline_samples_per_s": round(pipeline_sps, 1),
      "trainer_samples_per_s": trainer,
      "headroom": None if hr is None else round(hr, 2),
      "pipeline_samples_per_s_in_process": round(runs[0]["samples_per_s"], 1),
      "worker_speedup": round(pipeline_sps / runs[0]["samples_per_s"], 2),
      "num_workers": a.num_workers,
      "batch_size": a.batch_size,
      "history": a.history,
      "cache_mb": a.cache_mb,
      "embodiments": embodiments,
      "cpu_count": os.cpu_count(),
  }
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  main()
