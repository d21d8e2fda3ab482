"""How much of a PPO batch's policy gradient is signal: agreement between independent batches at fixed parameters.

    python experiments/ppo_gradient_snr.py --workdir=workdirs/sft_vs_ppo [--config=configs/default.py] \\
        [--batches=8] [--warmup=10] [--config.ppo.num_envs=16] [--config.ppo.embodiments=grid_goto_ego]

Loads the SFT agent of a pipeline workdir (`WORKDIR/sft`, with `WORKDIR/data` and `WORKDIR/rvq/artifact`), builds
the VLM PPO learner of the config's ``ppo`` section (`gea_jax.train.ppo.VlmPPO`) and, with the policy held fixed,
runs ``--warmup`` iterations whose batches are discarded, then ``--batches`` more. Every iteration is PPO's value
warm-up (`ppo.value_warmup_iterations`): the value head trains on the batch, nothing else changes, so the advantages
have the baseline PPO's own would have (SFT leaves the value head untrained) and, as episodes continue across
iterations, the measured batches hold the running mix of early and late episode steps, as in training. For each
measured batch and embodiment it takes the gradient of PPO's surrogate at ratio 1, -mean(adv * log pi(a|s)) over that
body's rows with the learner's own advantages (GAE, normalized per body), before the batch's value update: the
direction of the first minibatch step of an update, before Adam rescales it. The value head's explained variance of
the GAE targets on the measured batches is reported beside it. Write each batch's gradient as g_k = mu + e_k (mu: the expected gradient, e_k: the
batch's noise, variance tr(S) / B for B transitions). The mean pairwise cosine c between batches estimates
|mu|^2 / (|mu|^2 + tr(S) / B), so the batch whose signal equals its noise holds B * (1 - c) / c transitions
(``transitions_for_snr_1``). Adam normalizes every parameter's step, so with c near 0 an update is mostly a random
step of the same size as a useful one. Prints a table and, as the last line, a JSON object.
"""

from __future__ import annotations

import itertools
import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Agent config (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "The pipeline (or sft_vs_ppo) workdir holding the agent.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Independent batches whose gradients are compared (>= 2).")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Value-only iterations run first (their batches are not measured).")

GROUPS = ("embed_tokens", "lora", "vision_encoder", "projector", "state_")  # substrings of parameter paths


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax.flatten_util import ravel_pytree

  from gea_jax import sharding
  from gea_jax.agent.context import load_context
  from gea_jax.agent.policy import action_scores, candidate_ids
  from gea_jax.train import ppo as ppo_lib
  from gea_jax.train.pipeline import embodiment_names

  if _BATCHES.value < 2:
    raise app.UsageError("--batches must be >= 2 (cosines are taken between pairs of batches)")
  config, wd = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  config.data.data_dir = config.data.data_dir or os.path.join(wd, "data")
  config.sft.tokenizer_artifact = config.sft.tokenizer_artifact or os.path.join(wd, "rvq", "artifact")
  names = ppo_lib.embodiment_names(config)
  ctx = load_context(config, config.sft.tokenizer_artifact, config.data.data_dir, embodiment_names(config))
  model = ppo_lib.load_sft_model(config, wd, ctx)
  config.ppo.value_warmup_iterations = _WARMUP.value + _BATCHES.value  # every update trains the value head only
  wrt, mode = ppo_lib.prepare_model(model, config)
  learner = ppo_lib.VlmPPO(config.ppo, ctx, model, wrt, names, seed=int(config.seed))
  p, L = config.ppo, ctx.layout
  cand = candidate_ids(ctx.vocab.mask_table)
  batch = jax.jit(learner.batch_rows)

  def surrogate(params, data, e):
    m = nnx.merge(learner.graphdef, params, learner.rest)
    logp_tok = action_scores(m, L, data, learner.mask_table, candidate_ids=cand, temperature=float(p.temperature))[0]
    logp = jnp.sum(logp_tok * data["token_valid"], 1)
    rows = (data["embodiment_id"] == e).astype(jnp.float32)
    return -jnp.sum(rows * data["adv"] * logp) / jnp.sum(rows)

  grad = jax.jit(jax.grad(surrogate), static_argnums=2)
  # parameter groups, to see where the agreeing part of the gradient lives (value and grounding heads get none)
  paths = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in
           jax.tree_util.tree_flatten_with_path(learner.params)[0]]
  group_of = lambda path: next((g for g in GROUPS if g in path), "other")
  sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(learner.params)]
  group_index = np.repeat([group_of(q) for q in paths], sizes)  # ravel_pytree's order = the leaves' order
  grads = {n: [] for n in names}
  stats = {n: [] for n in names}
  explained = {n: [] for n in names}
  for it in range(_WARMUP.value + _BATCHES.value):
    trajs, boots, s = learner.collect(it)
    if it >= _WARMUP.value:
      with sharding.use_mesh(learner.mesh, learner.rules):
        data = batch(trajs, boots, None if learner.critic_state is None else learner.critic_state[0])
        for n, e in zip(names, learner.ids):
          grads[n].append(np.asarray(ravel_pytree(grad(learner.params, data, e))[0], np.float64))
          stats[n].append(s[f"{n}/reward_per_step"])
          rows = np.asarray(data["embodiment_id"]) == e
          target, value = np.asarray(data["target"])[rows], np.asarray(data["old_value"])[rows]
          explained[n].append(1.0 - np.var(target - value) / max(np.var(target), 1e-12))
    learner.update(it, trajs, boots)  # the value head only (see the module docstring)
  per_body = int(p.num_envs) * int(p.unroll_length)
  out = {"workdir": wd, "train_mode": mode, "transitions_per_batch": per_body, "batches": _BATCHES.value,
         "num_params": int(grads[names[0]][0].size), "bodies": {}}
  print("| body | transitions per batch | mean pairwise cosine | cosine to the mean of the others | "
        "transitions for SNR 1 | reward per step | value head's explained variance |")
  print("|---|---|---|---|---|---|---|")
  for n in names:
    g = [x / np.linalg.norm(x) for x in grads[n]]
    pair = [float(a @ b) for a, b in itertools.combinations(g, 2)]
    loo = []  # each batch against the mean of the others (a less noisy reference)
    for k in range(len(g)):
      rest = np.sum([grads[n][j] for j in range(len(g)) if j != k], axis=0)
      loo.append(float(g[k] @ rest / np.linalg.norm(rest)))
    c = float(np.mean(pair))
    by_group = {}
    for grp in GROUPS + ("other",):
      sel = group_index == grp
      sub = [x[sel] for x in grads[n]]
      if not sel.any() or min(np.linalg.norm(x) for x in sub) == 0:
        continue
      sub = [x / np.linalg.norm(x) for x in sub]
      norm_share = float(np.mean([np.linalg.norm(x[sel]) ** 2 / np.linalg.norm(x) ** 2 for x in grads[n]]))
      by_group[grp] = {"params": int(sel.sum()), "share_of_squared_norm": round(norm_share, 4),
                       "mean_pairwise_cosine": round(float(np.mean([a @ b for a, b in itertools.combinations(sub, 2)])),
                                                     4)}
    need = per_body * (1 - c) / c if c > 0 else float("inf")
    out["bodies"][n] = {"mean_pairwise_cosine": round(c, 4), "pairwise_cosine_std": round(float(np.std(pair)), 4),
                        "cosine_to_mean_of_others": round(float(np.mean(loo)), 4),
                        "transitions_for_snr_1": round(need) if c > 0 else None, "reward_per_step": float(np.mean(stats[n])),
                        "value_explained_variance": round(float(np.mean(explained[n])), 3),
                        "groups": by_group}
    print(f"| {n} | {per_body} | {c:.4f} +- {np.std(pair):.4f} | {np.mean(loo):.4f} | {need:.0f} | "
          f"{np.mean(stats[n]):.4f} | {np.mean(explained[n]):.3f} |")
  print("| body | parameter group | parameters | share of the squared gradient norm | mean pairwise cosine |")
  print("|---|---|---|---|---|")
  for n in names:
    for grp, v in out["bodies"][n]["groups"].items():
      print(f"| {n} | {grp} | {v['params']} | {v['share_of_squared_norm']:.3f} | {v['mean_pairwise_cosine']:.4f} |")
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
