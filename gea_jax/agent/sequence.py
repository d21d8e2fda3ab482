"""From pipeline samples to model inputs: the grain tokenization hook and the on-device action ids.

Text is tokenized on the host, in the grain pipeline (`SequenceBuilder`, a picklable hook); actions
are tokenized on the device inside the jitted step (`fill_action_ids`), because the RVQ encoder is a
JAX network. The hook therefore leaves the action slots as placeholders and passes the raw actions
(de-normalized back to the embodiment's units, which the RVQ tokenizer normalizes itself) along.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gea_jax.agent.prompt import PromptLayout, build_sequence, embodiment_prompt
from gea_jax.envs.spec import EmbodimentSpec
from gea_jax.tokenizers.action_vocab import PAD_ID


@dataclasses.dataclass
class SequenceBuilder:
  """The grain `tokenize` hook: standardized sample -> fixed-slot sequence + raw actions."""

  layout: PromptLayout
  text_tokenizer: Any
  specs: Sequence[EmbodimentSpec]       # in vocabulary order
  action_stats: Sequence[Any]           # per embodiment VectorStats | None (pipeline normalization)
  tokens_per_action: Sequence[int]      # per embodiment
  vocab_index: Sequence[int]            # pipeline embodiment_id -> vocabulary embodiment index
  max_state_dim: int
  max_action_dim: int
  normalization: str = "mean_std"

  def __post_init__(self):
    self._text_cache: dict[tuple[int, str], np.ndarray] = {}

  def __getstate__(self):
    d = dict(self.__dict__)
    d["_text_cache"] = {}
    return d

  def text_ids(self, embodiment_id: int, instruction: str) -> np.ndarray:
    key = (embodiment_id, instruction)
    ids = self._text_cache.get(key)
    if ids is None:
      text = f"{embodiment_prompt(self.specs[embodiment_id])} {instruction}"
      ids = np.asarray(self.text_tokenizer.encode(text), np.int32)
      if len(self._text_cache) < 100_000:
        self._text_cache[key] = ids
    return ids

  def raw_actions(self, sample) -> np.ndarray:
    """[F, Da]: continuous actions in the embodiment's units; discrete: the index in column 0."""
    e = self.vocab_index[int(sample["embodiment_id"])]
    src = np.asarray(sample["actions"], np.float32)
    a = np.zeros((src.shape[0], self.max_action_dim), np.float32)
    if bool(sample["is_discrete"]):
      a[:, 0] = np.maximum(np.asarray(sample["action_indices"]), 0)
      return a
    a[:, :src.shape[1]] = src[:, :self.max_action_dim]
    stats = self.action_stats[e]
    d = self.specs[e].action_space.dim
    if stats is not None and self.normalization != "none":
      a[:, :d] = stats.denormalize(a[:, :d], self.normalization)
    a[:, d:] = 0.0
    return a

  def __call__(self, sample) -> dict[str, np.ndarray]:
    L = self.layout
    e = self.vocab_index[int(sample["embodiment_id"])]
    valid = np.asarray(sample["history_mask"], bool)
    if valid.shape[0] != L.num_frames:
      raise ValueError(f"sample has a window of {valid.shape[0]} steps but the prompt layout expects "
                       f"history+1={L.num_frames} (data.history must equal layout.history + 1)")
    n_tok = int(self.tokens_per_action[e])
    tok_valid = np.arange(L.action_tokens) < n_tok
    zeros = np.zeros((L.history, L.action_tokens), np.int32)
    seq = build_sequence(L, self.text_ids(e, str(sample["instruction"])), valid, zeros,
                         np.zeros(L.action_tokens, np.int32), action_token_valid=tok_valid)
    src = np.asarray(sample["state"], np.float32)
    state = np.zeros((src.shape[0], self.max_state_dim), np.float32)
    state[:, :min(src.shape[1], self.max_state_dim)] = src[:, :self.max_state_dim]
    seq.update(image=np.asarray(sample["image"]), state=state,
               actions=self.raw_actions(sample), embodiment_id=np.int32(e),
               frame_valid=valid, action_token_valid=tok_valid,
               target_point=np.asarray(sample.get("target_point", np.full((L.num_frames, 2), -1.0)), np.float32))
    return seq


def fill_action_ids(vocab, layout: PromptLayout, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Tokenize the batch's actions on device and write them into the history/target slots.

  batch: input_ids [b,S], targets [b,S], actions [b,F,Da] raw, embodiment_id [b]. Returns a copy
  with input_ids/targets filled (unused positions keep the pad id and stay masked).
  """
  slots = layout.slots()
  b, f, da = batch["actions"].shape
  emb = jnp.repeat(batch["embodiment_id"], f)
  ids = vocab.encode(batch["actions"].reshape(b * f, 1, da), emb).reshape(b, f, -1)[..., :layout.action_tokens]
  ids = jnp.where(ids == PAD_ID, layout.pad_id, ids)
  input_ids = batch["input_ids"]
  if layout.history:
    hist_pos = jnp.asarray(slots["history_action_pos"]).reshape(-1)
    input_ids = input_ids.at[:, hist_pos].set(ids[:, :layout.history].reshape(b, -1))
  tgt = ids[:, -1]
  input_ids = input_ids.at[:, jnp.asarray(slots["target_pos"])].set(tgt)
  targets = batch["targets"].at[:, jnp.asarray(slots["logit_pos"])].set(tgt)
  return {**batch, "input_ids": input_ids, "targets": targets}


def sequence_builder(ctx, pipeline_embodiments: Sequence[str]) -> SequenceBuilder:
  """The hook for a pipeline over ``pipeline_embodiments`` (any subset/order of the context's)."""
  return SequenceBuilder(layout=ctx.layout, text_tokenizer=ctx.text_tokenizer, specs=ctx.specs,
                         action_stats=ctx.action_stats, tokens_per_action=ctx.tokens_per_action(),
                         vocab_index=[ctx.index(n) for n in pipeline_embodiments],
                         max_state_dim=ctx.max_state_dim, max_action_dim=ctx.vocab.max_dim,
                         normalization=ctx.normalization)
