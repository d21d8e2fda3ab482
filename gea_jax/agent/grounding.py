"""SFT's grounding loss: at each image token, does this part of the frame hold the object the instruction names?

The label comes from the expert data (`target_point`, recorded by `Embodiment.target_point` when the datasets are
built; privileged, never an input of the agent): the (row, col) of that object in the image, or -1 where the
embodiment does not say or the frame is padding. The image token whose pooling cell contains the point is the
positive, the frame's other image tokens are negatives. A linear head (`AgentModel.grounding_head`) reads the
LLM's last hidden state at every image slot; the loss is the sigmoid cross-entropy summed over a frame's image
tokens and averaged over the frames that have a label (0 when none has). Since the instruction precedes the frames
in the prompt layout, the image slots can see it, so the head can only succeed by matching what each token shows
to the words.

Why: trained on the action loss alone, the from-scratch default agent learned to act on its state token and ignored
its frames on the grid (shuffling the frames across a batch left its SFT loss unchanged; docs/benchmarks.md,
sessions 7 and 8). The action says too little about the frame; this label ties the frame to the words directly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gea_jax.agent.prompt import IMAGE_SLOT, PromptLayout


def image_slot_positions(layout: PromptLayout) -> np.ndarray:
  """int32 [num_frames, image_tokens]: the sequence position of each frame's image tokens, in token order."""
  slots = layout.slots()
  out = np.zeros((layout.num_frames, layout.image_tokens), np.int32)
  for f in range(layout.num_frames):
    pos = np.nonzero((slots["kind"] == IMAGE_SLOT) & (slots["frame_index"] == f))[0]
    out[f, slots["patch_index"][pos]] = pos
  return out


def token_labels(target_point: jax.Array, pool_grid: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  """target_point [..., 2] -> (one-hot labels [..., gh * gw] over the image tokens, has_label [...] bool).

  Image tokens are the row-major cells of the encoder's ``pool_grid`` over the image (`gea_jax.models.vlm`), so
  the point (row, col) falls in token ``floor(row * gh) * gw + floor(col * gw)``.
  """
  gh, gw = (int(g) for g in pool_grid)
  has = jnp.all(target_point >= 0, axis=-1)
  r = jnp.clip(jnp.floor(target_point[..., 0] * gh), 0, gh - 1).astype(jnp.int32)
  c = jnp.clip(jnp.floor(target_point[..., 1] * gw), 0, gw - 1).astype(jnp.int32)
  labels = jax.nn.one_hot(r * gw + c, gh * gw) * has[..., None]
  return labels, has


def grounding_loss(model, layout: PromptLayout, hidden: jax.Array,
                   target_point: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(loss, accuracy) of the grounding head on hidden states [b, S, d] of whole sequences.

  target_point [b, F, 2] (F = layout.num_frames; -1 rows: no label, which the pipeline also sets for the padding
  frames before an episode's start). accuracy: the fraction of labelled frames whose highest-scoring image token is
  the labelled one.
  """
  if model.grounding_head is None:
    raise ValueError("grounding_loss: the agent has no grounding head (model.grounding_head=False)")
  if target_point.shape[1:] != (layout.num_frames, 2):
    raise ValueError(f"grounding_loss: target_point must be [batch, num_frames={layout.num_frames}, 2], "
                     f"got {tuple(target_point.shape)}")
  pos = jnp.asarray(image_slot_positions(layout))                         # [F, T]
  h = hidden[:, pos]                                                      # [b, F, T, d]
  logits = model.grounding_head(h)[..., 0].astype(jnp.float32)            # [b, F, T]
  labels, has = token_labels(target_point.astype(jnp.float32), model.vlm.pool_grid)
  per_frame = jnp.sum(jnp.logaddexp(0.0, logits) - labels * logits, axis=-1)  # sigmoid cross-entropy, summed
  w = has.astype(jnp.float32)
  n = jnp.maximum(w.sum(), 1.0)
  loss = jnp.sum(per_frame * w) / n
  hit = jnp.argmax(logits, -1) == jnp.argmax(labels, -1)
  return loss, jnp.sum(hit * w) / n
