"""Benchmark: samples/s of the grain input pipeline, against what one SFT step consumes.

  .venv/bin/python experiments/bench_pipeline.py --data_dir=/tmp/gea_bench_data --num_workers=2

Builds the datasets with the real experts when they are missing (`--embodiments`, `--episodes`), then
times the pipeline of `data_pipelines.pipeline.make_train_iterator` (mixture, history window,
standardization, default pass-through tokenization, batching) in this process and with `--num_workers`
worker processes. Timing starts after `--warmup_batches` (worker start-up and the first episode reads are
excluded) and counts `--batches` batches.

The trainer side is `trainer_samples_per_s()`: the samples/s one jitted SFT step of the default config
consumes, timed in the same script on the same datasets (`--trainer_samples_per_s` overrides it with a
number measured elsewhere); `headroom` is pipeline / trainer (goal >= 5). The last line printed is one JSON object with pipeline_samples_per_s,
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


def trainer_samples_per_s(data_dir: str, embodiments: list[str], *, workdir: str, steps: int = 20,
                          warmup: int = 3) -> float:
  """Samples/s consumed by the SFT training step of configs/default.py on these datasets, in this process.

  Trains a throw-away RVQ tokenizer for the datasets (50 steps: its quality does not change the step's
  cost) when `workdir` has none, builds the default agent and its jitted, donated `sft.TrainStep`, feeds it
  batches of the real SFT iterator, and times `steps` steps after `warmup` (compilation excluded). The
  input pipeline runs in the same loop, so this is the trainer's end-to-end consumption rate.
  """
  from gea_jax.agent.config import agent_config  # noqa: PLC0415
  from gea_jax.agent.context import load_context  # noqa: PLC0415
  from gea_jax.train import pipeline, sft  # noqa: PLC0415
  from gea_jax.train import tokenizer as tok_lib  # noqa: PLC0415

  config = agent_config()
  config.data.embodiments = ",".join(embodiments)
  config.rvq.steps = 50
  artifact = os.path.join(workdir, "rvq", "artifact")
  if not os.path.isdir(artifact):
    tok_lib.run(pipeline.stage0_config(config, data_dir), os.path.join(workdir, "rvq"))
  ctx = load_context(config, artifact, data_dir, embodiments)
  mesh, rules = sft.mesh_and_rules(config)
  model, optimizer, wrt = sft.setup_model(config, ctx, mesh, rules)
  step = sft.TrainStep(ctx, model, optimizer, wrt, mesh)
  it = sft.make_iterator(config, ctx, data_dir, embodiments)
  import jax  # noqa: PLC0415
  for _ in range(warmup):
    jax.block_until_ready(step(sft.device_batch(next(it), mesh)))
  t0 = time.perf_counter()
  for _ in range(steps):
    out = step(sft.device_batch(next(it), mesh))
  jax.block_until_ready(out)
  return steps * int(config.sft.batch_size) / (time.perf_counter() - t0)


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
                 help="the SFT step's consumption rate, if measured elsewhere (skips timing it here)")
  p.add_argument("--trainer_steps", type=int, default=20, help="timed SFT steps")
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
  trainer = a.trainer_samples_per_s
  if trainer is None:
    trainer = trainer_samples_per_s(a.data_dir, embodiments, workdir=a.data_dir.rstrip("/") + "_trainer",
                                    steps=a.trainer_steps)
    print(f"trainer (SFT step of configs/default.py): {trainer:.1f} samples/s", file=sys.stderr)
  hr = headroom(pipeline_sps, trainer)
  result = {
      "pipeline_samples_per_s": round(pipeline_sps, 1),
      "trainer_samples_per_s": round(trainer, 2),
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
