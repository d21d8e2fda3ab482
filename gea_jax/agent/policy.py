"""The policy over action tokens: the SFT loss, token-by-token sampling with the KV cache, re-scoring.

The distribution at each action-token position is the LLM's softmax restricted to the ids valid for
the row's embodiment at that position (`ActionVocab.mask_table`), in training and in acting alike.
An action's log-probability is the sum over its tokens' log-probabilities.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gea_jax.agent.prompt import PromptLayout

_NEG = -1e9


def masked_logits(model, hidden: jax.Array, emb: jax.Array, mask_table: jax.Array, first_pos: int = 0):
  """hidden [b,T,d] -> float32 logits [b,T,V] with invalid ids at -1e9 (positions first_pos..)."""
  logits = model.llm.lm_logits(hidden).astype(jnp.float32)
  t = hidden.shape[1]
  valid = mask_table[emb][:, first_pos:first_pos + t]
  return jnp.where(valid, logits, _NEG)


def action_scores(model, layout: PromptLayout, batch, mask_table):
  """Teacher-forced pass over full sequences: per-token log-probs [b,T], entropy [b,T], value [b].

  batch holds input_ids/attention_mask/positions/targets/image/state/embodiment_id (action ids filled).
  """
  slots = layout.slots()
  out = model.forward(batch["input_ids"], batch["image"], batch["state"], batch["attention_mask"],
                      batch["positions"])
  logit_pos = jnp.asarray(slots["logit_pos"])
  h = out.hidden_states[:, logit_pos]
  logits = masked_logits(model, h, batch["embodiment_id"], mask_table)
  logp_all = jax.nn.log_softmax(logits, axis=-1)
  tgt = batch["targets"][:, logit_pos]
  logp = jnp.take_along_axis(logp_all, tgt[..., None], axis=-1)[..., 0]
  probs = jnp.exp(logp_all)
  entropy = -jnp.sum(jnp.where(logits > _NEG / 2, probs * logp_all, 0.0), axis=-1)
  value = None
  if model.vlm.value_head is not None:
    value = model.value(out.hidden_states[:, layout.prompt_len - 1])
  return logp, entropy, value, logits


def sft_loss(model, layout: PromptLayout, batch, mask_table):
  """Cross-entropy on the action tokens only. Returns (loss, metrics)."""
  slots = layout.slots()
  logp, _, _, logits = action_scores(model, layout, batch, mask_table)
  lm = batch["loss_mask"][:, jnp.asarray(slots["logit_pos"])].astype(jnp.float32)
  denom = jnp.maximum(lm.sum(), 1.0)
  loss = -jnp.sum(logp * lm) / denom
  tgt = batch["targets"][:, jnp.asarray(slots["logit_pos"])]
  acc = jnp.sum((jnp.argmax(logits, -1) == tgt) * lm) / denom
  return loss, {"loss": loss, "token_accuracy": acc}


def sample_token(model, h, emb, mask_table, j: int, used, key, *, greedy: bool, temperature: float, pad_id: int):
  """Action token ``j`` from the hidden state ``h`` [b,1,d]: (token [b], its log-prob [b], 0 where unused)."""
  logits = masked_logits(model, h, emb, mask_table, first_pos=j)[:, 0]
  logp_all = jax.nn.log_softmax(logits / (1.0 if greedy else temperature), axis=-1)
  tok = jnp.argmax(logits, -1) if greedy else jax.random.categorical(key, logp_all)
  tok = jnp.where(used, tok, pad_id).astype(jnp.int32)
  return tok, jnp.where(used, jnp.take_along_axis(logp_all, tok[:, None], -1)[:, 0], 0.0)


class Decoded(NamedTuple):
  tokens: jax.Array     # [b, T] sampled ids (pad where the embodiment uses fewer tokens)
  logp: jax.Array       # [b] sum of the used tokens' log-probs
  value: jax.Array      # [b] value estimate at the prompt (zeros without a value head)


def decode_action_tokens(model, layout: PromptLayout, prompt, mask_table, token_valid, key, *, greedy: bool,
                         temperature: float = 1.0) -> Decoded:
  """Sample the T action tokens one by one with the KV cache.

  prompt: input_ids/attention_mask/positions of length prompt_len, image, state, embodiment_id.
  token_valid: bool [b, T] which positions the row's embodiment uses.
  """
  b = prompt["input_ids"].shape[0]
  T = layout.action_tokens
  cache = model.llm.init_cache(b, layout.seq_len)
  out = model.forward(prompt["input_ids"], prompt["image"], prompt["state"], prompt["attention_mask"],
                      prompt["positions"], cache=cache)
  cache = out.cache
  h = out.hidden_states[:, -1:]
  value = (model.value(h[:, 0]) if model.vlm.value_head is not None else jnp.zeros((b,), jnp.float32))
  emb = prompt["embodiment_id"]
  tokens, total = [], jnp.zeros((b,), jnp.float32)
  for j in range(T):
    key, sub = jax.random.split(key)
    tok, logp = sample_token(model, h, emb, mask_table, j, token_valid[:, j], sub, greedy=greedy,
                             temperature=temperature, pad_id=layout.pad_id)
    used = token_valid[:, j]
    total = total + logp
    tokens.append(tok)
    if j + 1 < T:
      step = model.llm.forward(tok[:, None], attention_mask=used[:, None].astype(jnp.int32), cache=cache,
                               compute_logits=False)
      cache, h = step.cache, step.hidden_states
  return Decoded(jnp.stack(tokens, 1), total, value)
