"""Does the trained agent find the instruction's object in its frames? Teacher-forced probe per dataset split.

    python experiments/grounding_probe.py --workdir=workdirs/demo [--config=configs/default.py] \\
        [--embodiment=grid_goto_ego] [--batches=8] [--batch_size=64]

Loads the SFT agent of a pipeline workdir (`WORKDIR/sft`, with `WORKDIR/data` and `WORKDIR/rvq/artifact`, or
``--config.data.data_dir`` / ``--config.sft.tokenizer_artifact``) and scores ``--batches`` batches of each split of
the embodiment's dataset (train, heldout_seed, heldout_combo): the grounding head's accuracy (does the image token it
scores highest hold the object the instruction names, `gea_jax.agent.grounding`), the action loss and the action
token accuracy. Train against held-out seeds says whether the binding of words to image tokens generalizes to new
rooms; against held-out combinations, whether it is compositional (colour-kind pairs never seen together). Prints a
table and, as the last line, a JSON object with the per-split figures.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Agent config (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "The pipeline workdir holding the SFT agent.")
_EMBODIMENT = flags.DEFINE_string("embodiment", "", "Embodiment whose dataset splits are probed (\"\" = the config's "
                                  "first grid body).")
_BATCHES = flags.DEFINE_integer("batches", 8, "Batches per split.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Samples per batch.")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from data_pipelines.pipeline import make_train_iterator
  from data_pipelines.rlds_builder import open_dataset
  from gea_jax.agent.context import load_context
  from gea_jax.agent.policy import sft_loss
  from gea_jax.agent.sequence import fill_action_ids, sequence_builder
  from gea_jax.train import sft
  from gea_jax.train.pipeline import embodiment_names
  from gea_jax.train.ppo import load_sft_model

  config, wd, name = _CONFIG.value, _WORKDIR.value, _EMBODIMENT.value
  data_dir = config.data.data_dir or os.path.join(wd, "data")
  artifact = config.sft.tokenizer_artifact or os.path.join(wd, "rvq", "artifact")
  names = embodiment_names(config)
  name = name or next((n for n in names if n.startswith("grid")), "")
  if name not in names:
    raise app.UsageError(f"--embodiment={name!r} is not one of the config's data.embodiments {names}")
  ctx = load_context(config, artifact, data_dir, names)
  model = load_sft_model(config, wd, ctx)
  if model.grounding_head is None:
    raise app.UsageError("the agent has no grounding head (model.grounding_head=False): nothing to probe")
  mask_table = jnp.asarray(ctx.vocab.mask_table)

  @jax.jit
  def score(batch):
    batch = fill_action_ids(ctx.vocab, ctx.layout, batch)
    return sft_loss(model, ctx.layout, batch, mask_table, grounding_weight=1.0)[1]

  rows = {}
  for split in open_dataset(data_dir, name).splits:
    it = make_train_iterator(data_dir, [name], None, batch_size=_BATCH_SIZE.value, seq_len=None,
                             history=int(config.data.history), tokenize=sequence_builder(ctx, [name]), seed=0,
                             split=split, num_workers=0, image_size=ctx.image_size, normalization=ctx.normalization)
    out = [score({k: jnp.asarray(v) for k, v in sft.model_arrays(next(it)).items()}) for _ in range(_BATCHES.value)]
    rows[split] = {k: round(float(np.mean([o[k] for o in out])), 4)
                   for k in ("grounding_accuracy", "action_loss", "token_accuracy")}
  print(f"| split ({name}) | grounding accuracy | action loss | action token accuracy |")
  print("|---|---|---|---|")
  for split, r in rows.items():
    print(f"| {split} | {r['grounding_accuracy']:.1%} | {r['action_loss']:.3f} | {r['token_accuracy']:.1%} |")
  print(json.dumps({"workdir": wd, "embodiment": name, "samples_per_split": _BATCHES.value * _BATCH_SIZE.value,
                    "splits": rows}))


if __name__ == "__main__":
  app.run(main)
