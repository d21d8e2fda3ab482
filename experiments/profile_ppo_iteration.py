"""Where a VLM PPO iteration's wall time goes: collection vs update, per iteration.

    .venv/bin/python experiments/profile_ppo_iteration.py --workdir=DIR [--iterations=8] [--config.ppo.X=...]

``--workdir``: a run of ``--config`` (default configs/default.py) whose datasets, RVQ tokenizer and SFT checkpoint
are reused (each stage is skipped when its output exists, as in experiments/sft_vs_ppo.py; missing ones are built).
PPO runs ``--iterations`` iterations from the SFT agent into ``DIR/ppo`` (removed first, so every run starts at
iteration 0) with `VlmPPO.collect` and `VlmPPO.update` timed on the host, blocked on their outputs. The first
iteration includes compilation. Last line: JSON with the per-iteration times and the medians of the others.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Agent config (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A run of the config (datasets, tokenizer, SFT).", required=True)
_ITERS = flags.DEFINE_integer("iterations", 8, "PPO iterations to time (the first compiles).")


def main(argv):
  del argv
  from gea_jax.train import pipeline, sft
  from gea_jax.train import ppo as ppo_lib

  config = _CONFIG.value
  config.ppo.iterations = _ITERS.value
  pipeline.validate(config)
  workdir = os.path.abspath(_WORKDIR.value)
  names = pipeline.embodiment_names(config)
  data_dir, artifact = pipeline.prepare_inputs(config, workdir)
  res = sft.train(config, workdir, artifact_dir=artifact, data_dir=data_dir, embodiments=names)
  shutil.rmtree(os.path.join(workdir, "ppo"), ignore_errors=True)
  times = {"collect": [], "update": []}
  collect, update = ppo_lib.VlmPPO.collect, ppo_lib.VlmPPO.update

  def timed_collect(self, it):
    t0 = time.perf_counter()
    out = jax.block_until_ready(collect(self, it))
    times["collect"].append(time.perf_counter() - t0)
    return out

  def timed_update(self, it, trajs, boots):
    t0 = time.perf_counter()
    out = update(self, it, trajs, boots)  # returns host metrics: already blocked
    times["update"].append(time.perf_counter() - t0)
    return out

  ppo_lib.VlmPPO.collect, ppo_lib.VlmPPO.update = timed_collect, timed_update
  try:
    ppo_lib.train(config, workdir, res.model, res.ctx, ppo_lib.embodiment_names(config), data_dir=data_dir)
  finally:
    ppo_lib.VlmPPO.collect, ppo_lib.VlmPPO.update = collect, update
  out = {k: [round(x, 2) for x in v] for k, v in times.items()}
  for k, v in times.items():
    out[f"{k}_median_s"] = round(statistics.median(v[1:]), 2) if len(v) > 1 else None
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
