"""The policy over action tokens: the SFT loss, token-by-token sampling with the KV cache, re-scoring.

The distribution at each action-token position is the LLM's softmax restricted to the ids valid for
the row's embodiment at that position (`ActionVocab.mask_table`), in training and in acting alike.
An action's log-probability is the sum over its tokens' log-probabilities.

Acting (`decode_action_tokens`) runs the prompt through the LLM into a KV cache, then one cached step per
further action token. The prompt's text part (embodiment prompt + instruction, ``text_len`` slots) is the
longest and is constant for an episode, so it can be cached once (`text_prefix_cache`) and passed as
``prefix_cache``: each decision then runs only the frame part (history frames + current frame) on top of the
text's cache. RoPE positions are explicit (those of the full prompt), so this is the same computation split
in two and gives the same tokens, log-probs and values (up to float rounding). Passes whose outputs are only
the cache (the text) or only the last position (a prompt) run the LLM's last layer for just those positions
(``keep_last``), and sampling computes logits only over the action ids (``candidate_ids``), not the ~50k text ids.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gea_jax.agent.grounding import grounding_loss
from gea_jax.agent.prompt import PromptLayout
from gea_jax.models.kv_cache import KVCache

_NEG = -1e9


def masked_logits(model, hidden: jax.Array, emb: jax.Array, mask_table: jax.Array, first_pos: int = 0,
                  candidate_ids=None):
  """hidden [b,T,d] -> float32 logits [b,T,V] with invalid ids at -1e9 (positions first_pos..).

  candidate_ids: static int array [C] (`candidate_ids`) holding every id ``mask_table`` allows: only those
  columns are computed, [b,T,C] in that order. The softmax is the same (the other ids' exp(-1e9 - max) is 0).
  """
  logits = model.llm.lm_logits(hidden, candidate_ids).astype(jnp.float32)
  t = hidden.shape[1]
  valid = mask_table[emb][:, first_pos:first_pos + t]
  if candidate_ids is not None:
    valid = jnp.take(valid, jnp.asarray(candidate_ids, jnp.int32), axis=-1)
  return jnp.where(valid, logits, _NEG)


def candidate_ids(mask_table) -> np.ndarray:
  """The ids any embodiment may emit at any action position (host side): the columns `sample_token` needs."""
  return np.nonzero(np.asarray(mask_table).any(axis=(0, 1)))[0].astype(np.int32)


def action_scores(model, layout: PromptLayout, batch, mask_table, value_trunk_grad=None, candidate_ids=None,
                  temperature: float = 1.0, hidden_states=None):
  """Teacher-forced pass over full sequences: per-token log-probs [b,T], entropy [b,T], value [b], greedy ids [b,T].

  batch holds input_ids/attention_mask/positions/targets/image/state/embodiment_id (action ids filled).
  value_trunk_grad: None, or a scalar in [0, 1] scaling the value's gradient into the shared trunk (0: the
  value loss trains the value head only, as in PPO's value warm-up).
  candidate_ids: `candidate_ids(mask_table)` (static, sorted): logits only over the action ids, the same
  log-probs, entropy and greedy ids as over the whole vocabulary (the others are masked to exp(-1e9) = 0).
  temperature: log-probs and entropy of the policy that samples at this temperature (`sample_token`'s), as PPO
  must score the actions its collector drew; greedy ids do not depend on it.
  hidden_states: the model's [b,S,d] hidden states of this batch when the caller already ran the forward pass.
  """
  slots = layout.slots()
  if hidden_states is None:
    hidden_states = model.forward(batch["input_ids"], batch["image"], batch["state"], batch["attention_mask"],
                                  batch["positions"]).hidden_states
  logit_pos = jnp.asarray(slots["logit_pos"])
  h = hidden_states[:, logit_pos]
  logits = masked_logits(model, h, batch["embodiment_id"], mask_table, candidate_ids=candidate_ids)
  valid = logits > _NEG / 2
  if temperature != 1.0:
    logits = jnp.where(valid, logits / temperature, _NEG)
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  tgt = batch["targets"][:, logit_pos]
  greedy = jnp.argmax(logits, -1)
  if candidate_ids is not None:  # ids -> columns of the candidate logits (unused slots' pad id: any column)
    cand = jnp.asarray(candidate_ids, jnp.int32)
    tgt = jnp.clip(jnp.searchsorted(cand, tgt), 0, cand.shape[0] - 1)
    greedy = cand[greedy]
  logp = jnp.take_along_axis(logp_all, tgt[..., None], axis=-1)[..., 0]
  probs = jnp.exp(logp_all)
  entropy = -jnp.sum(jnp.where(valid, probs * logp_all, 0.0), axis=-1)
  value = None
  if model.vlm.value_head is not None:
    hv = hidden_states[:, layout.prompt_len - 1]
    if value_trunk_grad is not None:
      hv = value_trunk_grad * hv + (1.0 - value_trunk_grad) * jax.lax.stop_gradient(hv)
    value = model.value(hv)
  return logp, entropy, value, greedy


def sft_loss(model, layout: PromptLayout, batch, mask_table, candidate_ids=None, grounding_weight: float = 0.0,
             per_row: bool = False):
  """Cross-entropy on the action tokens only. Returns (loss, metrics). candidate_ids: see `action_scores`.

  per_row: metrics also hold ``row_nll`` [b] (each sequence's summed negative log-likelihood) and ``row_tokens`` [b]
  (its action tokens), for losses per group of rows (e.g. per embodiment).

  grounding_weight > 0: plus that times `gea_jax.agent.grounding.grounding_loss` on the same forward pass (needs
  the model's grounding head and ``batch["target_point"]``); metrics then also hold action_loss, grounding_loss and
  grounding_accuracy ("loss" is the total).
  """
  slots = layout.slots()
  hidden = None
  if grounding_weight:
    hidden = model.forward(batch["input_ids"], batch["image"], batch["state"], batch["attention_mask"],
                           batch["positions"]).hidden_states
  logp, _, _, greedy = action_scores(model, layout, batch, mask_table, candidate_ids=candidate_ids,
                                     hidden_states=hidden)
  lm = batch["loss_mask"][:, jnp.asarray(slots["logit_pos"])].astype(jnp.float32)
  denom = jnp.maximum(lm.sum(), 1.0)
  loss = -jnp.sum(logp * lm) / denom
  tgt = batch["targets"][:, jnp.asarray(slots["logit_pos"])]
  acc = jnp.sum((greedy == tgt) * lm) / denom
  metrics = {"loss": loss, "token_accuracy": acc}
  if per_row:
    metrics.update(row_nll=-jnp.sum(logp * lm, 1), row_tokens=jnp.sum(lm, 1))
  if grounding_weight:
    g_loss, g_acc = grounding_loss(model, layout, hidden, batch["target_point"])
    metrics.update(action_loss=loss, grounding_loss=g_loss, grounding_accuracy=g_acc)
    loss = loss + grounding_weight * g_loss
    metrics["loss"] = loss
  return loss, metrics


def sample_token(model, h, emb, mask_table, j: int, used, key, *, greedy: bool, temperature: float, pad_id: int,
                 candidate_ids=None):
  """Action token ``j`` from the hidden state ``h`` [b,1,d]: (token [b], its log-prob [b], 0 where unused).

  key: one key for the batch, or a key per row ([b] keys: a row's draw then does not depend on the other rows,
  e.g. on how an evaluation's episodes are split over processes).

  candidate_ids: see `masked_logits` (the same distribution from ~C instead of ~V logits; a sampled token for a
  given key differs from the full-vocabulary draw, greedy tokens do not).
  """
  logits = masked_logits(model, h, emb, mask_table, first_pos=j, candidate_ids=candidate_ids)[:, 0]
  logp_all = jax.nn.log_softmax(logits / (1.0 if greedy else temperature), axis=-1)
  if greedy:
    col = jnp.argmax(logits, -1)
  elif jnp.ndim(key):  # a key per row: each row's draw depends on its own key only
    col = jax.vmap(jax.random.categorical)(key, logp_all)
  else:
    col = jax.random.categorical(key, logp_all)
  logp = jnp.take_along_axis(logp_all, col[:, None], -1)[:, 0]
  tok = col if candidate_ids is None else jnp.asarray(candidate_ids, jnp.int32)[col]
  tok = jnp.where(used, tok, pad_id).astype(jnp.int32)
  return tok, jnp.where(used, logp, 0.0)


class Decoded(NamedTuple):
  tokens: jax.Array     # [b, T] sampled ids (pad where the embodiment uses fewer tokens)
  logp: jax.Array       # [b] sum of the used tokens' log-probs
  value: jax.Array      # [b] value estimate at the prompt (zeros without a value head)
  cache: KVCache | None = None  # `decode_action_tokens`: the KV cache after the last action-token step


def text_prefix_cache(model, layout: PromptLayout, text_ids: jax.Array, text_mask: jax.Array) -> KVCache:
  """KV cache [b, seq_len] holding the text part of the prompt (slots 0..text_len), for `decode_action_tokens`.

  text_ids, text_mask: [b, text_len] left-padded text (as given to `prompt.assemble`). Recompute it when a row's
  text changes (a new episode / instruction); the cache itself is never modified by decoding.
  """
  if text_ids.ndim != 2 or text_ids.shape[1] != layout.text_len:
    raise ValueError(f"text_prefix_cache: text_ids must be [batch, text_len={layout.text_len}], "
                     f"got shape {tuple(text_ids.shape)}")
  if text_mask.shape != text_ids.shape:
    raise ValueError(f"text_prefix_cache: text_mask shape {tuple(text_mask.shape)} != text_ids shape "
                     f"{tuple(text_ids.shape)}")
  b = text_ids.shape[0]
  mask = text_mask.astype(jnp.int32)
  positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)  # as in prompt.assemble
  cache = model.llm.init_cache(b, layout.seq_len)
  return model.forward(text_ids.astype(jnp.int32), None, None, mask, positions, cache=cache, keep_last=0).cache


def check_prefix_cache(layout: PromptLayout, prefix_cache: KVCache, batch: int) -> None:
  """Raise if ``prefix_cache`` is not a `text_prefix_cache` of this layout for ``batch`` rows."""
  if prefix_cache.batch_size != batch:
    raise ValueError(f"prefix_cache holds {prefix_cache.batch_size} rows but the prompt has {batch}")
  if prefix_cache.max_len != layout.seq_len:
    raise ValueError(f"prefix_cache has {prefix_cache.max_len} slots, expected seq_len={layout.seq_len}: make it "
                     f"with text_prefix_cache for this layout")
  if not isinstance(prefix_cache.index, jax.core.Tracer) and int(prefix_cache.index) != layout.text_len:
    raise ValueError(f"prefix_cache holds {int(prefix_cache.index)} slots, expected the text's "
                     f"text_len={layout.text_len}: make it with text_prefix_cache")


def split_key(key) -> tuple[jax.Array, jax.Array]:
  """``jax.random.split(key)`` for one key, or row by row for a key per row ([b] keys)."""
  if jnp.ndim(key):
    keys = jax.vmap(jax.random.split)(key)
    return keys[:, 0], keys[:, 1]
  k, sub = jax.random.split(key)
  return k, sub


def decode_action_tokens(model, layout: PromptLayout, prompt, mask_table, token_valid, key, *, greedy: bool,
                         temperature: float = 1.0, prefix_cache: KVCache | None = None,
                         candidate_ids=None) -> Decoded:
  """Sample the T action tokens one by one with the KV cache.

  prompt: input_ids/attention_mask/positions of length prompt_len, image, state, embodiment_id.
  token_valid: bool [b, T] which positions the row's embodiment uses.
  key: one key, or a key per row ([b]; see `sample_token`).
  prefix_cache: `text_prefix_cache` of the prompt's text part (the caller keeps them in sync): only the
    frame part (slots text_len..prompt_len) is run, on top of it. None: the whole prompt is run. Its slots from
    text_len on may hold anything (e.g. the previous decision's keys / values: see `reuse_prefix_buffers`) as
    long as they are not ``valid``: they are written before they are read.
  candidate_ids: `candidate_ids(mask_table)` (static): logits only over the action ids (see `sample_token`).
  """
  b, n = prompt["input_ids"].shape
  T = layout.action_tokens
  if n != layout.prompt_len:
    raise ValueError(f"decode_action_tokens: prompt input_ids of length {n}, expected prompt_len={layout.prompt_len}")
  if prefix_cache is None:
    cache = model.llm.init_cache(b, layout.seq_len)
    out = model.forward(prompt["input_ids"], prompt["image"], prompt["state"], prompt["attention_mask"],
                        prompt["positions"], cache=cache, keep_last=1)
  else:
    check_prefix_cache(layout, prefix_cache, b)
    s = layout.text_len
    out = model.forward(prompt["input_ids"][:, s:], prompt["image"], prompt["state"],
                        prompt["attention_mask"][:, s:], prompt["positions"][:, s:], cache=prefix_cache,
                        offset=s, keep_last=1, text_ids=prompt["input_ids"][:, :s],
                        text_mask=prompt["attention_mask"][:, :s])
  cache = out.cache
  h = out.hidden_states[:, -1:]
  value = (model.value(h[:, 0]) if model.vlm.value_head is not None else jnp.zeros((b,), jnp.float32))
  emb = prompt["embodiment_id"]
  tokens, total = [], jnp.zeros((b,), jnp.float32)
  for j in range(T):
    key, sub = split_key(key)
    tok, logp = sample_token(model, h, emb, mask_table, j, token_valid[:, j], sub, greedy=greedy,
                             temperature=temperature, pad_id=layout.pad_id, candidate_ids=candidate_ids)
    used = token_valid[:, j]
    total = total + logp
    tokens.append(tok)
    if j + 1 < T:
      step = model.llm.forward(tok[:, None], attention_mask=used[:, None].astype(jnp.int32), cache=cache,
                               compute_logits=False)
      cache, h = step.cache, step.hidden_states
  return Decoded(jnp.stack(tokens, 1), total, value, cache)


def reuse_prefix_buffers(prefix_cache: KVCache, used: KVCache) -> KVCache:
  """``prefix_cache`` (a `text_prefix_cache`) holding the key / value buffers of ``used``, the cache a decision
  returned (`Decoded.cache`) on top of it.

  ``used`` has the same text slots (decoding only writes slots from text_len on) plus the decision's frame and
  action slots; with ``prefix_cache``'s ``valid`` / ``next_position`` / ``index`` those are not valid, so the next
  decision overwrites them before reading them, and decodes exactly as on ``prefix_cache``. Carrying these
  buffers across env steps (instead of ``prefix_cache``'s) lets XLA write each decision's slots in place rather
  than copy the whole cache of every layer per decision.
  """
  return prefix_cache.replace(keys=used.keys, values=used.values)
