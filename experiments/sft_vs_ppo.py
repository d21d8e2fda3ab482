"""GEA's online-RL lesson in miniature: the SFT agent against the same agent after PPO (stage 2).

    python experiments/sft_vs_ppo.py --workdir=workdirs/sft_vs_ppo [--config=configs/default.py] \\
        [--ppo_iterations=30] [--config.sft.steps=1000]

Runs (or resumes: every stage is skipped when its output exists in the workdir) the default pipeline's
datasets, RVQ tokenizer and SFT, evaluates the SFT agent closed-loop on the held-out splits, then runs
``--ppo_iterations`` iterations of the VLM PPO (`gea_jax.train.ppo`) from it and evaluates again, on the same
episodes (same seeds). Each evaluation runs twice: as is, and with injected perturbations (uniformly random
actions for ``--perturb_length`` steps from step ``--perturb_start``) to test recovery. Prints a markdown
table and, as the last line, a JSON object with ``ppo_minus_sft`` (mean success difference over the
held-out rows, percentage points; GEA's goal >= +10) and ``ppo_minus_sft_perturbed``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Agent config (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/sft_vs_ppo", "Where datasets, tokenizer and runs go.")
_PPO_ITERS = flags.DEFINE_integer("ppo_iterations", 30, "PPO iterations after SFT (overrides ppo.iterations).")
_PERTURB_START = flags.DEFINE_integer("perturb_start", 4, "First env step of the random-action perturbation.")
_PERTURB_LEN = flags.DEFINE_integer("perturb_length", 4, "Number of random-action steps.")


def _evaluate(config, model, ctx, names, data_dir, stage, perturb):
  from gea_jax.train.pipeline import evaluate_rows
  rows = evaluate_rows(config, model, ctx, names, data_dir, stage=stage, perturb=perturb)
  return {(r["embodiment"], r["split"]): r for r in rows}


def compare(sft: dict, ppo: dict) -> tuple[list[dict], float]:
  """Per-row success difference (points) and its mean."""
  rows = []
  for key, a in sft.items():
    b = ppo[key]
    rows.append({"embodiment": key[0], "split": key[1], "sft": a["success_rate"], "sft_ppo": b["success_rate"],
                 "difference_points": 100.0 * (b["success_rate"] - a["success_rate"]),
                 "expert": a.get("expert_success_rate")})
  mean = sum(r["difference_points"] for r in rows) / max(len(rows), 1)
  return rows, mean


def main(argv):
  del argv
  from gea_jax.train import pipeline, sft
  from gea_jax.train import ppo as ppo_lib

  config = _CONFIG.value
  config.ppo.iterations = _PPO_ITERS.value
  pipeline.validate(config)
  workdir = os.path.abspath(_WORKDIR.value)
  names = pipeline.embodiment_names(config)
  perturb = (_PERTURB_START.value, _PERTURB_LEN.value)
  data_dir, artifact = pipeline.prepare_inputs(config, workdir)
  t0 = time.time()
  res = sft.train(config, workdir, artifact_dir=artifact, data_dir=data_dir, embodiments=names)
  print(f"SFT: {res.steps} steps ({time.time() - t0:.0f}s)", file=sys.stderr)
  before = {p: _evaluate(config, res.model, res.ctx, names, data_dir, "sft", p) for p in (None, perturb)}
  t0 = time.time()
  ppo_res = ppo_lib.train(config, workdir, res.model, res.ctx, ppo_lib.embodiment_names(config), data_dir=data_dir)
  print(f"PPO: {ppo_res.iterations} iterations ({time.time() - t0:.0f}s)", file=sys.stderr)
  after = {p: _evaluate(config, ppo_res.model, res.ctx, names, data_dir, "sft+ppo", p) for p in (None, perturb)}

  plain, plain_mean = compare(before[None], after[None])
  pert, pert_mean = compare(before[perturb], after[perturb])
  print(f"SFT {res.steps} steps, PPO {ppo_res.iterations} iterations; perturbation: random actions for steps "
        f"{perturb[0]}..{perturb[0] + perturb[1] - 1}; {config.eval.episodes} episodes per row")
  print("| embodiment | split | perturbed | SFT | SFT + PPO | difference (points) | expert |")
  print("|---|---|---|---|---|---|---|")
  for tag, rows in (("no", plain), ("yes", pert)):
    for r in rows:
      print(f"| {r['embodiment']} | {r['split']} | {tag} | {r['sft']:.2f} | {r['sft_ppo']:.2f} | "
            f"{r['difference_points']:+.1f} | {r['expert']} |")
  print(json.dumps({"ppo_minus_sft": round(plain_mean, 2), "ppo_minus_sft_perturbed": round(pert_mean, 2),
                    "sft_steps": res.steps, "ppo_iterations": ppo_res.iterations,
                    "episodes": int(config.eval.episodes), "rows": plain, "rows_perturbed": pert}))


if __name__ == "__main__":
  app.run(main)
