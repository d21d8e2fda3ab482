"""How much grid_goto data does grounding need? A small learner built for the task, on the SFT datasets.

    python experiments/grid_learnability.py --data_dir=WORKDIR/data [--steps=6000] [--batch_size=32]

The VLM agent has to learn, from the expert's (image, instruction) -> action steps alone, which cell holds
"the purple key" and where that is relative to the agent. This script trains a learner with that structure
built in, as a reference for what the data allows: a CNN over the 64x64 image (the agent's tiny CNN, with
CoordConv), the instruction's colour and kind words as embeddings that gate every cell's features (FiLM-like
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

from gea_jax.envs.grid import ACTION_NAMES, COLOURS, OBJECTS

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


def init(key, state_dim: int, width: int = 64) -> dict[str, jax.Array]:
  ks = jax.random.split(key, 8)
  he = jax.nn.initializers.he_normal()
  return {"c1": he(ks[0], (3, 3, 5, 32)), "c2": he(ks[1], (3, 3, 32, width)), "c3": he(ks[2], (3, 3, width, width)),
          "colour": jax.random.normal(ks[3], (len(COLOURS), width)) * 0.1,
          "kind": jax.random.normal(ks[4], (len(KINDS), width)) * 0.1,
          "s1": he(ks[5], (width, width)), "s2": he(ks[6], (width, 1)),
          "h1": he(ks[7], (width + 2 + state_dim, 128)), "h2": he(jax.random.fold_in(key, 9), (128, len(ACTION_NAMES)))}


def logits(p, image, state, colour, kind):
  b, h, w, _ = image.shape
  x = image.astype(jnp.float32) / 127.5 - 1.0
  rows, cols = jnp.meshgrid(jnp.linspace(-1, 1, h), jnp.linspace(-1, 1, w), indexing="ij")
  x = jnp.concatenate([x, jnp.broadcast_to(jnp.stack([rows, cols], -1), (b, h, w, 2))], -1)
  for name in ("c1", "c2", "c3"):
    x = jax.nn.gelu(jax.lax.conv_general_dilated(x, p[name], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))
  q = p["colour"][colour] + p["kind"][kind]
  score = jax.nn.gelu((x * q[:, None, None]) @ p["s1"]) @ p["s2"]  # [b, H', W', 1]: does this cell match?
  hh, ww = x.shape[1:3]
  attn = jax.nn.softmax(score.reshape(b, -1), -1).reshape(b, hh, ww, 1)
  r8, c8 = jnp.meshgrid(jnp.linspace(0, 1, hh), jnp.linspace(0, 1, ww), indexing="ij")
  where = jnp.stack([(attn[..., 0] * r8).sum((1, 2)), (attn[..., 0] * c8).sum((1, 2))], -1)
  what = (attn * x).sum((1, 2))
  return jax.nn.gelu(jnp.concatenate([what, where, state], -1) @ p["h1"]) @ p["h2"]


def main(argv):
  del argv
  train, test = load(_DATA.value, "train"), load(_DATA.value, "heldout_seed")
  keys = ("image", "state", "colour", "kind")
  forward_share = float((test["action"] == 0).mean())
  print(f"train steps {len(train['action'])}, held-out steps {len(test['action'])}, "
        f"held-out share of 'forward' {forward_share:.3f}")
  params = init(jax.random.key(_SEED.value), train["state"].shape[-1])
  opt = optax.adam(_LR.value)
  opt_state = opt.init(params)

  def loss_fn(p, batch):
    lo = logits(p, *(batch[k] for k in keys))
    return optax.softmax_cross_entropy_with_integer_labels(lo, batch["action"]).mean()

  @jax.jit
  def step(p, s, batch):
    loss, g = jax.value_and_grad(loss_fn)(p, batch)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  @jax.jit
  def accuracy(p, data):
    return jnp.mean(jnp.argmax(logits(p, *(data[k] for k in keys)), -1) == data["action"])

  rng = np.random.default_rng(_SEED.value)
  t0 = time.time()
  for i in range(_STEPS.value):
    idx = rng.integers(0, len(train["action"]), _BATCH.value)
    params, opt_state, loss = step(params, opt_state, {k: v[idx] for k, v in train.items()})
    if i % 250 == 0 or i == _STEPS.value - 1:
      print(f"step {i}: loss {float(loss):.3f}, held-out accuracy {float(accuracy(params, test)):.3f} "
            f"({time.time() - t0:.0f} s)", flush=True)
  sub = {k: v[:4096] for k, v in train.items()}
  print(json.dumps({"heldout_accuracy": round(float(accuracy(params, test)), 4),
                    "train_accuracy": round(float(accuracy(params, sub)), 4), "forward_share": round(forward_share, 4),
                    "train_steps": int(len(train["action"])), "steps": _STEPS.value, "batch_size": _BATCH.value}))


if __name__ == "__main__":
  app.run(main)
