"""The end-to-end run of configs/default.py: data -> RVQ -> SFT -> eval -> PPO -> eval -> report.

    python -m gea_jax.main --config=configs/default.py --workdir=workdirs/demo

Every stage leaves its output in the workdir and is skipped (or resumed) when the run is restarted:
datasets in ``data/`` (or ``data.data_dir``), the tokenizer artifact in ``rvq/artifact``, SFT
checkpoints in ``sft/checkpoints``; the final ``report.json`` / ``report.md`` compare the agent's
success on held-out tasks with the experts' that generated the data.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import ml_collections
from absl import logging

from gea_jax import config_validation as cv
from gea_jax.train import sft as sft_lib


def validate_embodiments(config) -> list[str]:
  """``data.embodiments``: at least one, all registered; returns the names."""
  from gea_jax.envs import registry
  names = embodiment_names(config)
  cv.require(bool(names), "data.embodiments", "must name at least one embodiment")
  for e in names:
    cv.require(e in registry.names(), "data.embodiments", f"unknown embodiment (known: {', '.join(registry.names())})", e)
  return names


def validate(config) -> None:
  sft_lib.validate_model(config)
  sft_lib.validate_sft(config)
  cv.positive(config, "data.episodes")
  cv.positive(config, "data.heldout_episodes")
  episodes_per_embodiment(config)
  action_noise(config)
  sft_lib.mixture_weights(config, embodiment_names(config))
  cv.positive(config, "rvq.num_levels")
  cv.positive(config, "rvq.codebook_size")
  cv.positive(config, "rvq.steps")
  cv.positive(config, "rvq.batch_size")
  cv.one_of(config, "rvq.vocab_mode", ("extend", "reuse_tail"))
  cv.positive(config, "eval.episodes")
  if config.eval.get("decoding", None):
    from gea_jax.eval import DECODING
    cv.one_of(config, "eval.decoding", DECODING)
  cv.positive(config, "ppo.iterations", allow_zero=True)
  for s in config.eval.splits:
    cv.require(s in ("train", "heldout_seed", "heldout_combo"), "eval.splits",
               "entries must be train / heldout_seed / heldout_combo", s)
  names = validate_embodiments(config)
  for e in cv.name_list(config.ppo.get("embodiments", "")):
    cv.require(e in names, "ppo.embodiments", f"must be some of data.embodiments ({', '.join(names)})", e)
  if int(config.ppo.iterations) > 0:
    from gea_jax.train import ppo as ppo_lib
    ppo_lib.validate_mesh(config)  # envs and minibatches split evenly over the mesh's batch axes


def embodiment_names(config) -> list[str]:
  """``data.embodiments`` ("a,b") as a list of names."""
  return cv.name_list(config.data.embodiments)


def episodes_per_embodiment(config) -> dict[str, int]:
  """Train episodes of each embodiment of ``data.embodiments``: ``data.episodes``, overridden by
  ``data.episodes_by_embodiment`` ("grid_goto=1000,reacher=200"; names must be registered embodiments)."""
  counts = {name: int(config.data.episodes) for name in embodiment_names(config)}

  def positive_int(value):
    if not (str(value).strip().isdigit() and int(value) > 0):
      raise ValueError(value)
    return int(value)

  given = cv.per_embodiment(config, "data.episodes_by_embodiment", positive_int, "positive int")
  # entries for embodiments this run does not use are ignored
  counts.update({name: n for name, n in given.items() if name in counts})
  return counts


def action_noise(config) -> dict[str, float]:
  """``data.action_noise`` ("reacher=0.3,grid_goto=0.2"): DART noise of each embodiment's train-split demonstrations
  (a std for continuous actions, the probability of a random move for discrete ones)."""
  from data_pipelines.build import parse_action_noise
  try:
    noise = parse_action_noise(str(config.data.get("action_noise", "") or ""))
  except ValueError as e:
    raise cv.ConfigError(f"data.action_noise: {e}") from None
  from gea_jax.envs import registry
  for name in noise:
    cv.require(name in registry.names(), "data.action_noise", f"unknown embodiment (known: {', '.join(registry.names())})",
               name)
    if not registry.make(name).spec.action_space.is_continuous:
      cv.require(noise[name] <= 1.0, "data.action_noise", "a probability in [0, 1] (discrete actions)",
                 f"{name}={noise[name]}")
    if noise[name] > 0:
      from data_pipelines import experts
      try:
        experts.get(name, closed_loop=True)
      except KeyError as e:
        raise cv.ConfigError(f"data.action_noise: {e.args[0]}") from None
  names = embodiment_names(config)
  return {k: v for k, v in noise.items() if k in names}  # entries for bodies this run does not use are ignored


def build_data(config, data_dir: str) -> dict:
  """The expert datasets (each skipped when it exists). In a multi-host job process 0 builds them and the others
  wait for it (``data_dir`` must be a file system all hosts share)."""
  import jax
  if jax.process_count() > 1:
    from gea_jax import distributed
    summary = _build_data(config, data_dir) if jax.process_index() == 0 else {}
    distributed.barrier(f"expert datasets built in {data_dir}")
    return summary
  return _build_data(config, data_dir)


def _build_data(config, data_dir: str) -> dict:
  from data_pipelines.build import build
  summary = {}
  noise = action_noise(config)
  for name, n in episodes_per_embodiment(config).items():
    summary.update(build([name], n, data_dir, seed=int(config.seed), heldout_episodes=int(config.data.heldout_episodes),
                         action_noise={name: noise[name]} if name in noise else None))
  return summary


def stage0_config(config, data_dir: str) -> ml_collections.ConfigDict:
  """The tokenizer trainer's config (see configs/rvq.py) for this run's datasets."""
  c = ml_collections.ConfigDict()
  c.trainer = "tokenizer"
  c.rvq = ml_collections.ConfigDict(dict(num_levels=int(config.rvq.num_levels),
                                         codebook_size=int(config.rvq.codebook_size), latent_dim=16, hidden=256,
                                         num_layers=2, chunk_len=1, embodiment_dim=16, commitment=0.25,
                                         ema_decay=0.99, dead_code_threshold=50))
  c.train = ml_collections.ConfigDict(dict(steps=int(config.rvq.steps), batch_size=int(config.rvq.batch_size),
                                           lr=1e-3, warmup_steps=100, seed=int(config.seed),
                                           log_every=max(1, int(config.rvq.steps) // 10), eval_size=4096))
  c.data = ml_collections.ConfigDict(dict(source="tfds", data_dir=data_dir, split="train", max_episodes=0,
                                          expert_episodes=1, embodiments=tuple(embodiment_names(config))))
  from gea_jax.agent.context import resolve_text_tokenizer
  from gea_jax.interop.tokenizers import load_text_tokenizer
  text_vocab = load_text_tokenizer(resolve_text_tokenizer(config.model.text_tokenizer)).vocab_size
  c.vocab = ml_collections.ConfigDict(dict(llm_vocab_size=int(text_vocab), mode=str(config.rvq.vocab_mode)))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  return c


def prepare_inputs(config, workdir: str) -> tuple[str, str]:
  """Stages 1-2, each skipped when its output exists: (data_dir, RVQ artifact dir) for ``config``."""
  data_dir = config.data.data_dir or os.path.join(workdir, "data")
  logging.info("[1/5] datasets in %s", data_dir)
  build_data(config, data_dir)
  artifact = os.path.join(workdir, "rvq", "artifact")
  if not os.path.isdir(artifact):
    logging.info("[2/5] RVQ action tokenizer")
    from gea_jax.train import tokenizer as tok_lib
    tok_lib.run(stage0_config(config, data_dir), os.path.join(workdir, "rvq"))
  return data_dir, artifact


def expert_success(data_dir: str, name: str, split: str) -> float | None:
  from data_pipelines.rlds_builder import dataset_path
  meta = json.loads((Path(dataset_path(data_dir, name)) / "metadata.json").read_text())
  rate = meta.get("expert_success_rate", {})
  return rate.get(split) if isinstance(rate, dict) else rate


def eval_decoding(config) -> str | bool:
  """``eval.decoding`` (one of gea_jax.eval.DECODING); older configs with ``eval.greedy`` (bool) still work."""
  if config.eval.get("decoding", None):
    return str(config.eval.decoding)
  return bool(config.eval.get("greedy", True))


def eval_seed(config) -> int:
  """The seed of the held-out evaluation's episodes (`evaluate_rows`; probes that replay them use it too)."""
  return int(config.seed) + 1000


def evaluate_rows(config, model, ctx, names, data_dir: str, stage: str, perturb=None) -> list[dict]:
  """Held-out closed-loop success per embodiment and split, beside the expert's on the same split."""
  from gea_jax.eval import evaluate
  rows = evaluate(model, ctx, names, num_episodes=int(config.eval.episodes), splits=tuple(config.eval.splits),
                  seed=eval_seed(config), greedy=eval_decoding(config), perturb=perturb)
  for r in rows:
    ex = expert_success(data_dir, r["embodiment"], r["split"])
    r.update(stage=stage, expert_success_rate=ex, fraction_of_expert=(r["success_rate"] / ex) if ex else None)
  return rows


def run(config, workdir: str) -> dict:
  t0 = time.time()
  validate(config)
  workdir = os.path.abspath(workdir)
  names = embodiment_names(config)
  data_dir, artifact = prepare_inputs(config, workdir)
  from gea_jax.tokenizers.artifact import read_metadata
  rvq_metrics = read_metadata(artifact).get("metrics", {})

  logging.info("[3/5] SFT")
  result = sft_lib.train(config, workdir, artifact_dir=artifact, data_dir=data_dir, embodiments=names)
  if result.preempted:
    logging.warning("preempted during SFT at step %d; the checkpoint is saved, rerun the same command to resume",
                    result.steps)
    return {"preempted": True, "sft_steps": result.steps}

  logging.info("[4/5] closed-loop evaluation of the SFT agent")
  rows = evaluate_rows(config, result.model, result.ctx, names, data_dir, stage="sft")
  tables = {"closed-loop success (held-out), SFT": rows}
  curves = {k: v for k, v in result.curves.items() if k.startswith(("sft/loss", "sft/token_accuracy"))}
  ppo_summary = {}
  if int(config.ppo.iterations) > 0:
    logging.info("[5/5] online PPO from the SFT agent")
    from gea_jax.train import ppo as ppo_lib
    ppo_res = ppo_lib.train(config, workdir, result.model, result.ctx, ppo_lib.embodiment_names(config),
                            data_dir=data_dir)
    if ppo_res.preempted:  # no evaluation or report of an unfinished run; rerunning resumes PPO where it stopped
      logging.warning("preempted during PPO at iteration %d; the checkpoint is saved, rerun the same command to "
                      "resume", ppo_res.iterations)
      return {"preempted": True, "sft_steps": result.steps, "ppo_iterations": ppo_res.iterations}
    ppo_rows = evaluate_rows(config, ppo_res.model, result.ctx, names, data_dir, stage="sft+ppo")
    tables["closed-loop success (held-out), SFT + PPO"] = ppo_rows
    curves.update({k: v for k, v in ppo_res.curves.items() if k.endswith(("/loss", "success_rate", "reward_per_step"))})
    ppo_summary = {"ppo_iterations": ppo_res.iterations, "ppo_wall_time_s": round(ppo_res.wall_time, 1),
                   "ppo_env_steps_per_second": round(ppo_res.final_metrics.get("perf/env_steps_per_second", 0.0), 1)}
    rows = rows + ppo_rows
  summary = {**ppo_summary, "sft_steps": result.steps, "final_sft_loss": result.final_metrics.get("loss"),
             "final_token_accuracy": result.final_metrics.get("token_accuracy"),
             "wall_time_s": round(time.time() - t0, 1), "sft_wall_time_s": round(result.wall_time, 1),
             "rvq": rvq_metrics}
  from gea_jax.reporting import is_process_zero, write_report
  write_report(workdir, "gea_jax end-to-end run", tables=tables, curves=curves, summary=summary)
  for r in rows:
    logging.info("%s %s/%s: success %.2f (expert %s)", r["stage"], r["embodiment"], r["split"], r["success_rate"],
                 r["expert_success_rate"])
  if is_process_zero():
    print(json.dumps({"rows": rows, **{k: v for k, v in summary.items() if k != "rvq"}}, default=str))
  return {"rows": rows, "summary": summary}
