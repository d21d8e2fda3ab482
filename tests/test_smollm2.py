"""Real pretrained SmolLM2-135M-Instruct (packaged Q4_1 GGUF) in JAX: it answers, and matches transformers.

The JAX model is loaded with `gea_jax.interop.hf.load_causal_lm(<gguf>)` and decoded greedily with its KV
cache; the reference is transformers' `LlamaForCausalLM` loaded from the same GGUF (same dequantization).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from gea_jax.interop.gguf import smollm2_path
from gea_jax.interop.hf import load_causal_lm
from gea_jax.interop.tokenizers import load_text_tokenizer

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
MAX_NEW_TOKENS = 16


def greedy_generate(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None):
  """Greedy decoding with the model's KV cache: one prefill call, then one call per new token.

  Returns (new token ids, float32 logits of the prompt [len(prompt), vocab]).
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, ids, cache):
    out = nnx.merge(graphdef, state).forward(ids, cache=cache)
    return jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32), out.cache, out.logits

  cache = model.init_cache(1, len(prompt_ids) + max_new_tokens)
  token, cache, prompt_logits = step(state, jnp.asarray([prompt_ids], jnp.int32), cache)
  new = [int(token[0])]
  while len(new) < max_new_tokens and new[-1] != eos_id:
    token, cache, _ = step(state, token[:, None], cache)
    new.append(int(token[0]))
  return new, np.asarray(prompt_logits[0], np.float32)


@pytest.fixture(scope="module")
def run():
  path = smollm2_path()
  tok = load_text_tokenizer(path)
  model = load_causal_lm(path, jnp.float32)
  prompt_ids = tok.encode(tok.apply_chat_template(QUESTION, add_generation_prompt=True))
  new_ids, logits = greedy_generate(model, prompt_ids, MAX_NEW_TOKENS, tok.eos_id)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path)
  )
  ref.eval()
  with torch.no_grad():
    ref_logits = ref(torch.tensor([prompt_ids])).logits[0].numpy()
    ref_gen = ref.generate(
      torch.tensor([prompt_ids]),
      attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
      max_new_tokens=MAX_NEW_TOKENS,
      do_sample=False,
      eos_token_id=tok.eos_id,
      pad_token_id=tok.eos_id,
    )[0, len(prompt_ids) :].tolist()
  return dict(
    tok=tok, prompt_ids=prompt_ids, new_ids=new_ids, logits=logits, ref_logits=ref_logits, ref_gen=ref_gen
  )


def test_answers_paris(run):
  tok = run["tok"]
  answer = tok.decode(run["new_ids"], skip_special_tokens=True)
  assert "Paris" in answer, answer
  assert run["new_ids"][-1] == tok.eos_id  # it finished its turn (<|im_end|>) within the budget


def test_prompt_logits_match_transformers(run):
  ours, ref = run["logits"], run["ref_logits"]
  assert ours.shape == ref.shape == (len(run["prompt_ids"]), 49152)
  # Same weights, float32 both sides; observed max |diff| about 1e-4 with logits up to about 40.
  scale = float(np.abs(ref).max())
  assert scale > 10.0  # real, confident logits (random weights would give much smaller ones)
  np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_tokens_match_transformers_generate(run):
  assert run["new_ids"] == run["ref_gen"]
