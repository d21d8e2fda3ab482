"""GEA's online-RL lesson in miniature: the SFT agent against the same agent after PPO (stage 2).

    python experiments/sft_vs_ppo.py --workdir=workdirs/sft_vs_ppo [--config=configs/default.py] \\
        [--ppo_iterations=30] [--config.sft.steps=1000] [--last_checkpoints=3 --config.ppo.keep_checkpoints=3]

Runs (or resumes: every stage is skipped when its output exists in the workdir) the default pipeline's
datasets, RVQ tokenizer and SFT, evaluates the SFT agent closed-loop on the held-out splits, then runs
``--ppo_iterations`` iterations of the VLM PPO (`gea_jax.train.ppo`) from it and evaluates again, on the same
episodes (same seeds). Each evaluation runs twice: as is, and with injected perturbations (uniformly random
actions for ``--perturb_length`` steps from step ``--perturb_start``) to test recovery. Prints a markdown
table and, as the last line, a JSON object with ``ppo_minus_sft`` (mean success difference over the
held-out rows, percentage points; GEA's goal >= +10) and ``ppo_minus_sft_perturbed``.

``--last_checkpoints K`` also evaluates the K-1 checkpoints saved before the final one (held-out rows as is) and
adds ``ppo_minus_sft_last_k``, the mean over the K: neighbouring checkpoints of one run can differ by several points
(docs/benchmarks.md, session 20), so one checkpoint's few-point difference is not readable on its own.
``ppo_minus_sft`` stays the final checkpoint's.
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
_LAST = flags.DEFINE_integer("last_checkpoints", 1, "Evaluate the last K saved PPO checkpoints (held-out rows, as "
                             "is) and report their mean difference too; needs ppo.keep_checkpoints >= K.")


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
  last_k = _LAST.value
  if last_k < 1 or last_k > int(config.ppo.keep_checkpoints):
    raise ValueError(f"--last_checkpoints={last_k}: must be >= 1 and <= ppo.keep_checkpoints "
                     f"({config.ppo.keep_checkpoints}; set --config.ppo.keep_checkpoints)")
  data_dir, artifact = pipeline.prepare_inputs(config, workdir)
  t0 = time.time()
  res = sft.train(config, workdir, artifact_dir=artifact, data_dir=data_dir, embodiments=names)
  print(f"SFT: {res.steps} steps ({time.time() - t0:.0f}s)", file=sys.stderr)
  if res.preempted:
    sys.exit(f"preempted during SFT at step {res.steps}; its checkpoint is saved, rerun the command to resume")
  before = {p: _evaluate(config, res.model, res.ctx, names, data_dir, "sft", p) for p in (None, perturb)}
  t0 = time.time()
  ppo_res = ppo_lib.train(config, workdir, res.model, res.ctx, ppo_lib.embodiment_names(config), data_dir=data_dir)
  print(f"PPO: {ppo_res.iterations} iterations ({time.time() - t0:.0f}s)", file=sys.stderr)
  if ppo_res.preempted:
    sys.exit(f"preempted during PPO at iteration {ppo_res.iterations}; its checkpoint is saved, rerun the command "
             "to resume")
  after = {p: _evaluate(config, ppo_res.model, res.ctx, names, data_dir, "sft+ppo", p) for p in (None, perturb)}

  plain, plain_mean = compare(before[None], after[None])
  pert, pert_mean = compare(before[perturb], after[perturb])
  earlier = [i for i in ppo_lib.saved_iterations(config, workdir) if i < ppo_res.iterations][-(last_k - 1):] \
      if last_k > 1 else []
  if len(earlier) < last_k - 1:
    print(f"--last_checkpoints={last_k}: only {earlier} saved before iteration {ppo_res.iterations}; evaluating "
          "those", file=sys.stderr)
  last = []
  for it in earlier:  # after the final policy's evaluations: loading an earlier checkpoint replaces it
    ppo_lib.load_checkpoint(config, workdir, ppo_res.model, it)
    rows, mean = compare(before[None], _evaluate(config, ppo_res.model, res.ctx, names, data_dir, f"ppo@{it}", None))
    last.append({"iteration": it, "ppo_minus_sft": mean, "rows": rows})
  last.append({"iteration": ppo_res.iterations, "ppo_minus_sft": plain_mean, "rows": plain})
  print(f"SFT {res.steps} steps, PPO {ppo_res.iterations} iterations; perturbation: random actions for steps "
        f"{perturb[0]}..{perturb[0] + perturb[1] - 1}; {config.eval.episodes} episodes per row")
  print("| embodiment | split | perturbed | SFT | SFT + PPO | difference (points) | expert |")
  print("|---|---|---|---|---|---|---|")
  for tag, rows in (("no", plain), ("yes", pert)):
    for r in rows:
      print(f"| {r['embodiment']} | {r['split']} | {tag} | {r['sft']:.2f} | {r['sft_ppo']:.2f} | "
            f"{r['difference_points']:+.1f} | {r['expert']} |")
  last_mean = sum(c["ppo_minus_sft"] for c in last) / len(last)
  if len(last) > 1:
    print(f"\nLast {len(last)} checkpoints (held-out rows as is):\n")
    print("| iteration | " + " | ".join(f"{r['embodiment']} {r['split']}" for r in plain) + " | ppo_minus_sft |")
    print("|---|" + "---|" * (len(plain) + 1))
    for c in last:
      print(f"| {c['iteration']} | " + " | ".join(f"{r['sft_ppo']:.3f} ({r['difference_points']:+.1f})"
                                                  for r in c["rows"]) + f" | {c['ppo_minus_sft']:+.2f} |")
    print("| mean |" + " |" * len(plain) + f" {last_mean:+.2f} |")
  print(json.dumps({"ppo_minus_sft": round(plain_mean, 2), "ppo_minus_sft_perturbed": round(pert_mean, 2),
                    "ppo_minus_sft_last_k": round(last_mean, 2),
                    "last_k": [{"iteration": c["iteration"], "ppo_minus_sft": round(c["ppo_minus_sft"], 2)} for c in last],
                    "sft_steps": res.steps, "ppo_iterations": ppo_res.iterations,
                    "episodes": int(config.eval.episodes), "rows": plain, "rows_perturbed": pert}))


if __name__ == "__main__":
  app.run(main)
