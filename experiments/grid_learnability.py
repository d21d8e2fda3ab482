"""How much grid_goto data does grounding need? A small learner built for the task, on the SFT datasets.

    python experiments/grid_learnability.py --data_dir=WORKDIR/data [--steps=6000] [--batch_size=32]

The VLM agent has to learn, from the expert's (image, instruction) -> action steps alone, which cell holds
"the purple key" and where that is relative to the agent. This script trains a learner with that structure
built in, as a reference for what the data allows: the agent's own vision encoder (`TinyCNN`, CoordConv)
over the 64x64 image, the instruction's colour and kind words as embeddings that gate every cell's features (FiLM-like
product), a softmax over cells scored by that product, the attended features and position plus the state, and
an MLP to the 6 actions. Teacher-forced action accuracy on the held-out seeds split is printed every 250
steps, beside the share of "forward" labels (the accuracy of always saying forward). Last line: a JSON object
with the final held-out and training accuracies.

If this learner cannot generalise from a dataset, the VLM (which must discover the same structure through
attention, from scratch) will not either: see docs/benchmarks.md, "Why the grid agent does not ground".
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx

from gea_jax.envs.grid import ACTION_NAMES, COLOURS, OBJECTS
from gea_jax.models.tiny_cnn import TinyCNN

_DATA = flags.DEFINE_string("data_dir", None, "Directory holding the gea_episodes datasets (grid_goto).", required=True)
_STEPS = flags.DEFINE_integer("steps", 6000, "Adam steps.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Batch size.")
_LR = flags.DEFINE_float("lr", 1e-3, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Initialisation and batch-order seed.")

KINDS = OBJECTS + ("door",)


def load(data_dir: str, split: str) -> dict[str, np.ndarray]:
  """Every step of a split: image, state, colour id, kind id (parsed from "go to the <colour> <kind>"), action."""
  from data_pipelines.pipeline import make_dataset
  ds, _ = make_dataset(data_dir, ["grid_goto"], batch_size=None, history=1, num_epochs=1, shuffle=False,
                       split=split)  # states standardized as the agent sees them
  cols = {"image": [], "state": [], "colour": [], "kind": [], "action": []}
  for s in ds:
    words = str(s["instruction"]).split()
    if len(words) < 5 or words[3] not in COLOURS or words[4] not in KINDS:
      raise ValueError(f"{data_dir}: grid_goto/{split}: expected 'go to the <colour> <kind>', got {s['instruction']!r}")
    cols["image"].append(s["image"][0])
    cols["state"].append(s["state"][0])
    cols["colour"].append(COLOURS.index(words[3]))
    cols["kind"].append(KINDS.index(words[4]))
    cols["action"].append(int(s["action_indices"][0]))
  return {k: np.asarray(v) for k, v in cols.items()}


class Learner(nnx.Module):
  """The agent's vision encoder (`TinyCNN`, default channels, CoordConv) + word-gated cells + softmax over cells."""

  def __init__(self, state_dim: int, *, rngs: nnx.Rngs):
    self.cnn = TinyCNN(rngs=rngs, coord_channels=True)
    w = self.cnn.feature_dim
    self.colour = nnx.Embed(len(COLOURS), w, rngs=rngs)
    self.kind = nnx.Embed(len(KINDS), w, rngs=rngs)
    self.score1, self.score2 = nnx.Linear(w, w, rngs=rngs), nnx.Linear(w, 1, rngs=rngs)
    self.head1 = nnx.Linear(w + 2 + state_dim, 128, rngs=rngs)
    self.head2 = nnx.Linear(128, len(ACTION_NAMES), rngs=rngs)

  def __call__(self, image, state, colour, kind):
    x = self.cnn.features(image.astype(jnp.float32) / 127.5 - 1.0)  # [b, H', W', w]: one cell per feature
    b, hh, ww, _ = x.shape
    q = self.colour(colour) + self.kind(kind)
    score = self.score2(jax.nn.gelu(self.score1(x * q[:, None, None])))  # does this cell match the words?
    attn = jax.nn.softmax(score.reshape(b, -1), -1).reshape(b, hh, ww, 1)
    rows, cols = jnp.meshgrid(jnp.linspace(0, 1, hh), jnp.linspace(0, 1, ww), indexing="ij")
    where = jnp.stack([(attn[..., 0] * rows).sum((1, 2)), (attn[..., 0] * cols).sum((1, 2))], -1)
    what = (attn * x).sum((1, 2))
    return self.head2(jax.nn.gelu(self.head1(jnp.concatenate([what, where, state], -1))))


def main(argv):
  del argv
  train, test = load(_DATA.value, "train"), load(_DATA.value, "heldout_seed")
  keys = ("image", "state", "colour", "kind")
  forward_share = float((test["action"] == 0).mean())
  print(f"train steps {len(train['action'])}, held-out steps {len(test['action'])}, "
        f"held-out share of 'forward' {forward_share:.3f}")
  model = Learner(train["state"].shape[-1], rngs=nnx.Rngs(_SEED.value))
  optimizer = nnx.Optimizer(model, optax.adam(_LR.value), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    def loss_fn(m):
      lo = m(*(batch[k] for k in keys))
      return optax.softmax_cross_entropy_with_integer_labels(lo, batch["action"]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def accuracy(model, data):
    return jnp.mean(jnp.argmax(model(*(data[k] for k in keys)), -1) == data["action"])

  rng = np.random.default_rng(_SEED.value)
  t0 = time.time()
  for i in range(_STEPS.value):
    idx = rng.integers(0, len(train["action"]), _BATCH.value)
    loss = step(model, optimizer, {k: v[idx] for k, v in train.items()})
    if i % 250 == 0 or i == _STEPS.value - 1:
      print(f"step {i}: loss {float(loss):.3f}, held-out accuracy {float(accuracy(model, test)):.3f} "
            f"({time.time() - t0:.0f} s)", flush=True)
  sub = {k: v[:4096] for k, v in train.items()}
  print(json.dumps({"heldout_accuracy": round(float(accuracy(model, test)), 4),
                    "train_accuracy": round(float(accuracy(model, sub)), 4), "forward_share": round(forward_share, 4),
                    "train_steps": int(len(train["action"])), "steps": _STEPS.value, "batch_size": _BATCH.value}))


if __name__ == "__main__":
  app.run(main)
