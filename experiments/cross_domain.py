"""GEA's cross-domain lesson in miniature: one SFT model on all domains vs one model per domain.

    python experiments/cross_domain.py --workdir=workdirs/cross_domain [--steps_per_domain=400]

The same budget of SFT steps per domain: the cross-domain model trains ``steps_per_domain x domains``
steps on the mixture (so each domain gets the same number of samples in expectation), each per-domain
model ``steps_per_domain`` steps on its own data. Same datasets, same RVQ tokenizer, same architecture,
same seed. Success is measured closed-loop on held-out seeds (and held-out colour-object combinations
for the grid), decoded as the config's ``eval.decoding`` says (re-running resumes finished runs and only
re-evaluates). Prints a markdown table and, as the last line, a JSON object with
``cross_minus_per_domain`` (mean success difference, percentage points).
"""

from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", "workdirs/cross_domain", "Where datasets, tokenizer and runs go.")
_STEPS = flags.DEFINE_integer("steps_per_domain", 400, "SFT steps per domain.")
_EPISODES = flags.DEFINE_integer("episodes", 200, "Train episodes per embodiment.")
_EVAL_EPISODES = flags.DEFINE_integer("eval_episodes", 32, "Held-out episodes per embodiment and split.")
_EMBODIMENTS = flags.DEFINE_string("embodiments", "reacher,grid_goto_ego", "Domains (comma-separated).")


def main(argv):
  del argv
  from gea_jax.agent.config import agent_config
  from gea_jax.eval import evaluate
  from gea_jax.train import pipeline, sft

  workdir = os.path.abspath(_WORKDIR.value)
  names = [e for e in _EMBODIMENTS.value.split(",") if e]
  config = agent_config()
  config.data.embodiments = ",".join(names)
  config.data.weights = ""  # uniform: each domain gets the same share of the mixture, the budget this compares
  config.data.episodes = _EPISODES.value
  config.eval.episodes = _EVAL_EPISODES.value
  pipeline.validate(config)
  data_dir, artifact = pipeline.prepare_inputs(config, workdir)

  def run(tag, domains, steps):
    c = config.copy_and_resolve_references()
    c.sft.steps = steps
    c.sft.checkpoint_every = steps
    t0 = time.time()
    res = sft.train(c, os.path.join(workdir, tag), artifact_dir=artifact, data_dir=data_dir, embodiments=domains)
    rows = evaluate(res.model, res.ctx, domains, num_episodes=int(c.eval.episodes), splits=tuple(c.eval.splits),
                    seed=int(c.seed) + 1000, greedy=pipeline.eval_decoding(c))
    print(f"{tag}: {steps} steps in {time.time() - t0:.0f}s", file=sys.stderr)
    return {(r["embodiment"], r["split"]): r["success_rate"] for r in rows}

  cross = run("cross", names, _STEPS.value * len(names))
  per = {}
  for name in names:
    per.update(run(f"only_{name}", [name], _STEPS.value))
  rows = []
  for key in cross:
    rows.append({"embodiment": key[0], "split": key[1], "cross_domain": cross[key], "per_domain": per[key],
                 "difference_points": 100.0 * (cross[key] - per[key])})
  print("| embodiment | split | cross-domain | per-domain | difference (points) |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['embodiment']} | {r['split']} | {r['cross_domain']:.2f} | {r['per_domain']:.2f} | "
          f"{r['difference_points']:+.1f} |")
  mean = sum(r["difference_points"] for r in rows) / max(len(rows), 1)
  print(json.dumps({"cross_minus_per_domain": mean, "steps_per_domain": _STEPS.value, "rows": rows}))


if __name__ == "__main__":
  app.run(main)
