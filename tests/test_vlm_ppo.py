"""Stage 2 VLM PPO: sampled log-prob = teacher-forced, KV-cached decoding = recomputed context, decoding on a
text-prefix KV cache = decoding the whole prompt (single step, PPO collector with auto-resets, evaluation),
only the configured parameters change, one PPO run on grid_goto over the config's 8-device mesh (finite losses,
exact resume), and one iteration on 8 fake devices ((8,1,1), (2,4,1)) = on one device.

Fixtures (synthetic datasets, untrained RVQ artifact, tiny config) come from tests/test_sft.py.
"""

import os
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import test_sft
from flax import nnx
from test_sft import EMBODIMENTS, tiny_config
from tiny_agent_config import with_ppo

from gea_jax.agent.context import load_context
from gea_jax.agent.model import build_agent
from gea_jax.agent.policy import (
  action_scores,
  candidate_ids,
  decode_action_tokens,
  reuse_prefix_buffers,
  text_prefix_cache,
)
from gea_jax.agent.prompt import assemble
from gea_jax.agent.rollout import decode_without_cache, make_collector, make_reset_pool, refresh_prefix_rows
from gea_jax.checkpoint import CheckpointError
from gea_jax.envs import registry
from gea_jax.train import ppo

assets = test_sft.assets  # the module-scoped fixture: synthetic datasets + untrained RVQ artifact


def _config(mode="lora", history=None, film=False):
  c = tiny_config()
  if history is not None:
    c.data.history = history
  c.model.vision.text_film = film
  c.model.train_mode = mode
  with_ppo(c, num_envs=2, unroll_length=4, reset_pool=2, iterations=2, lr=1e-2)
  c.ppo.train_mode = ""  # follow model.train_mode (the default trains LoRA, GEA's choice)
  c.ppo.kl_coef = 0.1
  return c


def _setup(assets, mode="lora", history=None, film=False):
  config = _config(mode, history, film)
  ctx = load_context(config, assets["artifact"], assets["data_dir"], EMBODIMENTS)
  model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size, seed=1)
  if film:  # the FiLM layer starts at zero (no effect): give it weights, so the text really conditions the images
    enc = model.vlm.vision_encoder
    k = enc.film.kernel.get_value()
    enc.film.kernel.set_value(0.3 * jax.random.normal(jax.random.key(7), k.shape, k.dtype))
  return config, ctx, model


def _prompts(ctx, n=6, seed=0):
  """A batch of random prompts, alternating embodiments (reacher uses several action tokens)."""
  L = ctx.layout
  rng = np.random.default_rng(seed)
  emb = np.array([i % len(ctx.specs) for i in range(n)], np.int32)
  tpa = np.array(ctx.tokens_per_action())[emb]
  tok_valid = np.arange(L.action_tokens)[None] < tpa[:, None]
  lo, hi = ctx.vocab.first_id, ctx.vocab.first_id + ctx.vocab.num_ids
  text = rng.integers(1, 1000, (n, L.text_len)).astype(np.int32)
  tmask = (np.arange(L.text_len)[None] >= rng.integers(0, 8, (n, 1))).astype(np.int32)
  fvalid = np.arange(L.num_frames)[None] >= rng.integers(0, L.num_frames, (n, 1))
  hist = rng.integers(lo, hi, (n, L.history, L.action_tokens)).astype(np.int32)
  p = assemble(L, np, text, tmask, fvalid, hist, tok_valid)
  h, w = ctx.image_size
  p = {k: jnp.asarray(v) for k, v in p.items()}
  p.update(image=jnp.asarray(rng.integers(0, 255, (n, L.num_frames, h, w, 3)), jnp.uint8),
           state=jnp.asarray(rng.normal(size=(n, L.num_frames, ctx.max_state_dim)), jnp.float32),
           embodiment_id=jnp.asarray(emb))
  return p, jnp.asarray(tok_valid), (text, tmask, fvalid, hist)


@pytest.mark.parametrize("temperature,film", [(1.0, False), (0.5, False), (1.0, True)])
def test_sampled_logp_equals_teacher_forced(assets, temperature, film):
  """At any sampling temperature: what PPO's update re-scores is the log-prob the collector sampled with (also
  with the vision encoder conditioned on the text)."""
  _, ctx, model = _setup(assets, film=film)
  L = ctx.layout
  assert max(ctx.tokens_per_action()) > 1  # several tokens per action: the sum over tokens is exercised
  prompt, tok_valid, (text, tmask, fvalid, hist) = _prompts(ctx)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  dec = nnx.jit(lambda m, p, k: decode_action_tokens(m, L, p, mask_table, tok_valid, k, greedy=False,
                                                     temperature=temperature))(model, prompt, jax.random.key(3))
  seq = assemble(L, jnp, jnp.asarray(text), jnp.asarray(tmask), jnp.asarray(fvalid), jnp.asarray(hist), tok_valid,
                 target_action_ids=dec.tokens)
  seq.update(image=prompt["image"], state=prompt["state"], embodiment_id=prompt["embodiment_id"])
  logp_tok, ent_tok, value, greedy = nnx.jit(
      lambda m, b: action_scores(m, L, b, mask_table, temperature=temperature))(model, seq)
  tf_logp = jnp.sum(jnp.where(tok_valid, logp_tok, 0.0), 1)
  np.testing.assert_allclose(np.asarray(dec.logp), np.asarray(tf_logp), atol=1e-5)
  np.testing.assert_allclose(np.asarray(dec.value), np.asarray(value), atol=1e-5)
  # scoring over the action ids only (the trainers' path) gives the same log-probs, entropies and greedy ids
  cand = candidate_ids(ctx.vocab.mask_table)
  c_logp, c_ent, _, c_greedy = nnx.jit(
      lambda m, b: action_scores(m, L, b, mask_table, candidate_ids=cand, temperature=temperature))(model, seq)
  v = np.asarray(tok_valid)
  np.testing.assert_allclose(np.asarray(c_logp)[v], np.asarray(logp_tok)[v], atol=1e-5)
  np.testing.assert_allclose(np.asarray(c_ent)[v], np.asarray(ent_tok)[v], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(c_greedy)[v], np.asarray(greedy)[v])
  assert np.all(np.asarray(dec.logp) < 0)  # sampled among several valid ids
  lo, hi = ctx.vocab.first_id, ctx.vocab.first_id + ctx.vocab.num_ids
  used = np.asarray(dec.tokens)[np.asarray(tok_valid)]
  assert ((used >= lo) & (used < hi)).all()


def test_a_key_per_row_makes_each_rows_draw_its_own(assets):
  """With a key per row (how the evaluation samples), a row's tokens and log-prob do not depend on the other rows:
  decoding rows 2..5 alone gives what they got among all 6 (so an evaluation split over processes draws the same)."""
  _, ctx, model = _setup(assets)
  L = ctx.layout
  prompt, tok_valid, _ = _prompts(ctx)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  keys = jax.random.split(jax.random.key(5), 6)
  f = nnx.jit(lambda m, p, v, k: decode_action_tokens(m, L, p, mask_table, v, k, greedy=False))
  whole = f(model, prompt, tok_valid, keys)
  part = f(model, jax.tree.map(lambda x: x[2:], prompt), tok_valid[2:], keys[2:])
  np.testing.assert_array_equal(np.asarray(part.tokens), np.asarray(whole.tokens)[2:])
  np.testing.assert_allclose(np.asarray(part.logp), np.asarray(whole.logp)[2:], atol=1e-5)
  other = f(model, prompt, tok_valid, jax.random.split(jax.random.key(6), 6))  # the keys do drive the draws
  assert not np.array_equal(np.asarray(other.tokens), np.asarray(whole.tokens))


def test_kv_cache_decoding_equals_recomputed_context(assets):
  _, ctx, model = _setup(assets, "full")
  L = ctx.layout
  prompt, tok_valid, _ = _prompts(ctx, n=8, seed=1)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  outs = []
  for fn in (decode_action_tokens, decode_without_cache):
    f = nnx.jit(lambda m, p, k, fn=fn: fn(m, L, p, mask_table, tok_valid, k, greedy=True))
    outs.append(f(model, prompt, jax.random.key(0)))
  cached, full = outs
  np.testing.assert_array_equal(np.asarray(cached.tokens), np.asarray(full.tokens))
  np.testing.assert_allclose(np.asarray(cached.logp), np.asarray(full.logp), atol=1e-5)
  np.testing.assert_allclose(np.asarray(cached.value), np.asarray(full.value), atol=1e-5)
  # rows differ: greedy decoding depends on the context (a constant policy would pass trivially)
  assert len({tuple(r) for r in np.asarray(cached.tokens).tolist()}) > 1


@pytest.mark.parametrize("greedy,film", [(True, False), (False, False), (False, True)])
def test_text_prefix_cache_decoding_equals_whole_prompt(assets, greedy, film):
  """The frame part on top of the text's KV cache = the whole prompt (rows differ in text and history length);
  with ``film`` the vision encoder is conditioned on the text, which the frame part gets passed alongside."""
  _, ctx, model = _setup(assets, "full", film=film)
  L = ctx.layout
  prompt, tok_valid, (text, tmask, fvalid, _) = _prompts(ctx, n=8, seed=2)
  assert len(set(tmask.sum(1).tolist())) > 1 and len(set(fvalid.sum(1).tolist())) > 1  # the batch is mixed
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  prefix = nnx.jit(lambda m, t, tm: text_prefix_cache(m, L, t, tm))(model, jnp.asarray(text), jnp.asarray(tmask))
  assert int(prefix.index) == L.text_len and prefix.max_len == L.seq_len
  dec = nnx.jit(lambda m, p, k, c: decode_action_tokens(m, L, p, mask_table, tok_valid, k, greedy=greedy,
                                                        prefix_cache=c))
  whole = dec(model, prompt, jax.random.key(5), None)
  split = dec(model, prompt, jax.random.key(5), prefix)
  np.testing.assert_array_equal(np.asarray(split.tokens), np.asarray(whole.tokens))
  np.testing.assert_allclose(np.asarray(split.logp), np.asarray(whole.logp), atol=1e-5)
  np.testing.assert_allclose(np.asarray(split.value), np.asarray(whole.value), atol=1e-5)
  assert len({tuple(r) for r in np.asarray(whole.tokens).tolist()}) > 1
  # the text matters: a prefix of other texts changes the decision
  other = text_prefix_cache(model, L, jnp.asarray(np.roll(text, 1, 0)), jnp.asarray(np.roll(tmask, 1, 0)))
  wrong = dec(model, prompt, jax.random.key(5), other)
  assert not np.allclose(np.asarray(wrong.logp), np.asarray(whole.logp), atol=1e-3)


def test_prefix_cache_with_the_last_decisions_buffers_decodes_the_same(assets):
  """The collector carries the buffers a decision wrote (`reuse_prefix_buffers`): their frame / action slots hold
  the previous decision's keys and values, yet the next decision equals one on the fresh text cache."""
  _, ctx, model = _setup(assets, "full")
  L = ctx.layout
  prompt, tok_valid, (text, tmask, _, _) = _prompts(ctx, n=8, seed=3)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  prefix = nnx.jit(lambda m, t, tm: text_prefix_cache(m, L, t, tm))(model, jnp.asarray(text), jnp.asarray(tmask))
  dec = nnx.jit(lambda m, p, k, c: decode_action_tokens(m, L, p, mask_table, tok_valid, k, greedy=False,
                                                        prefix_cache=c))
  first = dec(model, prompt, jax.random.key(1), prefix)
  assert first.cache is not None and int(first.cache.index) == L.prompt_len + L.action_tokens - 1
  stale = reuse_prefix_buffers(prefix, first.cache)
  for a, b in zip(stale.keys, prefix.keys):  # text slots unchanged, the decision's slots written
    np.testing.assert_array_equal(np.asarray(a)[:, :, :L.text_len], np.asarray(b)[:, :, :L.text_len])
    assert not np.allclose(np.asarray(a)[:, :, L.text_len:], 0.0)
  np.testing.assert_array_equal(np.asarray(stale.valid), np.asarray(prefix.valid))
  # the next decision: same texts, other frames and states
  nxt = dict(prompt, image=jnp.roll(prompt["image"], 1, axis=0), state=prompt["state"] + 0.5)
  fresh, reused = dec(model, nxt, jax.random.key(2), prefix), dec(model, nxt, jax.random.key(2), stale)
  np.testing.assert_array_equal(np.asarray(reused.tokens), np.asarray(fresh.tokens))
  np.testing.assert_allclose(np.asarray(reused.logp), np.asarray(fresh.logp), atol=1e-6)
  np.testing.assert_allclose(np.asarray(reused.value), np.asarray(fresh.value), atol=1e-6)
  assert not np.allclose(np.asarray(fresh.value), np.asarray(first.value), atol=1e-4)  # the frames matter


@pytest.mark.parametrize("greedy", [True, False])
def test_logits_over_candidate_ids_give_the_same_policy(assets, greedy):
  """Decoding with logits only over the action ids (the collector's way) = over the whole vocabulary: same
  greedy tokens, same log-probs of the chosen tokens, and sampled tokens drawn from the same distribution."""
  _, ctx, model = _setup(assets, "full")
  L = ctx.layout
  prompt, tok_valid, (text, tmask, fvalid, hist) = _prompts(ctx, n=8, seed=3)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  cand = candidate_ids(ctx.vocab.mask_table)
  assert len(cand) < ctx.vocab.total_vocab_size // 10 and np.asarray(ctx.vocab.mask_table)[..., cand].sum() == \
      np.asarray(ctx.vocab.mask_table).sum()
  dec = nnx.jit(lambda m, p, k, c: decode_action_tokens(m, L, p, mask_table, tok_valid, k, greedy=greedy,
                                                        candidate_ids=c), static_argnums=3)
  full = dec(model, prompt, jax.random.key(7), None)
  part = dec(model, prompt, jax.random.key(7), tuple(int(i) for i in cand))
  used = np.asarray(tok_valid)
  assert np.isin(np.asarray(part.tokens)[used], cand).all()
  if greedy:
    np.testing.assert_array_equal(np.asarray(part.tokens), np.asarray(full.tokens))
    np.testing.assert_allclose(np.asarray(part.logp), np.asarray(full.logp), atol=1e-5)
  # the log-prob the candidate path reports for its tokens is the teacher-forced one over the whole vocabulary
  seq = assemble(L, jnp, jnp.asarray(text), jnp.asarray(tmask), jnp.asarray(fvalid), jnp.asarray(hist), tok_valid,
                 target_action_ids=part.tokens)
  seq.update(image=prompt["image"], state=prompt["state"], embodiment_id=prompt["embodiment_id"])
  logp_tok, _, _, _ = nnx.jit(lambda m, b: action_scores(m, L, b, mask_table))(model, seq)
  np.testing.assert_allclose(np.asarray(part.logp), np.asarray(jnp.sum(jnp.where(tok_valid, logp_tok, 0.0), 1)),
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(part.value), np.asarray(full.value), atol=1e-6)


def test_refresh_prefix_rows_equals_recomputing_all_rows(assets):
  """Reset rows' text caches recomputed in chunks = all rows recomputed and the reset ones kept."""
  _, ctx, model = _setup(assets, "full")
  L = ctx.layout
  _, _, (text, tmask, _, _) = _prompts(ctx, n=5, seed=4)
  _, _, (text2, tmask2, _, _) = _prompts(ctx, n=5, seed=5)
  f = nnx.jit(lambda m, c, d, t, tm, chunk: refresh_prefix_rows(m, L, c, d, t, tm, chunk), static_argnums=5)
  old = text_prefix_cache(model, L, jnp.asarray(text), jnp.asarray(tmask))
  new = text_prefix_cache(model, L, jnp.asarray(text2), jnp.asarray(tmask2))
  for done in ([0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 1, 1, 0], [1, 1, 1, 1, 1]):
    d = np.asarray(done, bool)
    for chunk in (1, 2, 5):
      got = f(model, old, jnp.asarray(d), jnp.asarray(text2), jnp.asarray(tmask2), chunk)
      assert int(got.index) == L.text_len
      for g, a, b in zip(jax.tree.leaves(got), jax.tree.leaves(new), jax.tree.leaves(old)):
        g, a, b = np.asarray(g), np.asarray(a), np.asarray(b)
        if g.ndim == 0:
          continue
        want = np.where(d.reshape((-1,) + (1,) * (g.ndim - 1)), a, b)
        np.testing.assert_allclose(g, want, atol=1e-5)


def test_text_prefix_cache_misuse_is_named(assets):
  _, ctx, model = _setup(assets, "full")
  L = ctx.layout
  prompt, tok_valid, (text, tmask, _, _) = _prompts(ctx, n=4, seed=0)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  with pytest.raises(ValueError, match="text_len"):
    text_prefix_cache(model, L, jnp.asarray(text[:, 1:]), jnp.asarray(tmask[:, 1:]))
  small = text_prefix_cache(model, L, jnp.asarray(text[:2]), jnp.asarray(tmask[:2]))
  with pytest.raises(ValueError, match="2 rows but the prompt has 4"):
    decode_action_tokens(model, L, prompt, mask_table, tok_valid, jax.random.key(0), greedy=True, prefix_cache=small)
  other = model.llm.init_cache(4, L.seq_len)
  with pytest.raises(ValueError, match="text_prefix_cache"):
    decode_action_tokens(model, L, prompt, mask_table, tok_valid, jax.random.key(0), greedy=True, prefix_cache=other)


@pytest.mark.parametrize("name,film", [("reacher", False), ("grid_goto", False), ("grid_goto", True)])
def test_collector_with_text_prefix_cache_equals_per_step_decoding(assets, name, film):
  """Same trajectory with the text cache carried across steps (and recomputed on auto-resets) as without."""
  _, ctx, model = _setup(assets, "full", film=film)
  e = ctx.index(name)
  env = registry.make(name, max_episode_steps=3)  # short episodes: the scan goes through auto-resets
  n, T = 3, 8
  (a, boot_a), (b, boot_b) = _collect_variants(ctx, model, e, env, T, n, dict(prefix_cache=True),
                                               dict(prefix_cache=False))
  done = np.asarray(a.termination | a.truncation)
  assert done[:-1].any()  # resets inside the scan
  text = np.asarray(a.text_ids)
  assert any(not np.array_equal(text[0, i], text[-1, i]) for i in range(n))  # reset rows got new instructions
  _assert_same_rollout(a, boot_a, b, boot_b, atol=1e-5)


def _collect_variants(ctx, model, e, env, T, n, *variants, on_call=None):
  """One jitted collector call per ``make_collector`` keyword set in ``variants`` (same pool and key):
  [(trajectory, bootstrap value)]; ``on_call(kw)`` runs after each call."""
  pool = make_reset_pool(env, ctx, e, jax.random.key(1), 8)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  graphdef, state = nnx.split(model)
  outs = []
  for kw in variants:
    collect = make_collector(ctx, e, env, T, greedy=False, **kw)
    f = jax.jit(lambda st, pool, key, mt, collect=collect: collect(nnx.merge(graphdef, st), pool, n, key, mt))
    outs.append(f(state, pool, jax.random.key(2), mask_table))
    if on_call is not None:
      on_call(kw)
  return outs


def _assert_same_rollout(a, boot_a, b, boot_b, atol):
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_array_equal(np.asarray(a.reward), np.asarray(b.reward))
  for x, y in ((a.logp, b.logp), (a.value, b.value), (boot_a, boot_b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


def test_collector_with_lora_folded_equals_unfolded(assets, monkeypatch):
  """Folding the LoRA adapters into (a copy of) the kernels for a collector call (the default) gives the same
  trajectory as running them beside the kernels (tests/test_lora.py: the fold leaves the model itself alone)."""
  from gea_jax.agent import rollout
  from gea_jax.models import lora as lora_lib
  from gea_jax.models.lora import LoraParam, lora_projections
  folds = []
  monkeypatch.setattr(rollout, "merged_copy", lambda m: folds.append(1) or lora_lib.merged_copy(m))
  _, ctx, model = _setup(assets, "lora")
  assert len(lora_projections(model)) == 7 * len(model.llm.layers)
  lora = nnx.state(model, LoraParam)  # B starts at zero: give the adapters weights, so that they act
  leaves, tree = jax.tree.flatten(lora)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape, x.dtype)
                                              for k, x in zip(keys, leaves)]))
  e = ctx.index("reacher")
  env = registry.make("reacher", max_episode_steps=3)
  n, T = 3, 6

  def folded_iff_asked(kw):  # once per traced call
    assert len(folds) == (1 if kw["fold_lora"] else 0)
    folds.clear()
  (a, boot_a), (b, boot_b) = _collect_variants(ctx, model, e, env, T, n, dict(fold_lora=True), dict(fold_lora=False),
                                               on_call=folded_iff_asked)
  _assert_same_rollout(a, boot_a, b, boot_b, atol=1e-4)


def test_continued_episodes_equal_one_longer_rollout(assets):
  """Two collector calls of T steps, the second continuing the episodes the first left running, give the same
  trajectory as one call of 2T steps (greedy, so the per-call keys do not matter; the text cache is recomputed
  at the start of the second call)."""
  from gea_jax.agent.rollout import initial_episodes
  _, ctx, model = _setup(assets, "full")
  e = ctx.index("grid_goto")
  env = registry.make("grid_goto")
  n, T = 3, 3
  pool = make_reset_pool(env, ctx, e, jax.random.key(1), 8)
  mask_table = jnp.asarray(ctx.vocab.mask_table)
  graphdef, state = nnx.split(model)
  long = make_collector(ctx, e, env, 2 * T, greedy=True)
  whole, boot_whole = jax.jit(lambda st, pool, mt: long(nnx.merge(graphdef, st), pool, n, jax.random.key(2), mt))(
      state, pool, mask_table)
  done = np.asarray(whole.termination | whole.truncation)
  assert not done[T:].any()  # precondition: no reset in the second half (its pool entries would differ)
  cont = make_collector(ctx, e, env, T, greedy=True, continue_episodes=True)
  f = jax.jit(lambda st, pool, key, mt, start: cont(nnx.merge(graphdef, st), pool, n, key, mt, start))
  first, _, running = f(state, pool, jax.random.key(3), mask_table, initial_episodes(ctx, pool, n))
  second, boot, _ = f(state, pool, jax.random.key(4), mask_table, running)
  for field in ("tokens", "reward", "text_ids", "states", "images"):
    got = np.concatenate([np.asarray(getattr(first, field)), np.asarray(getattr(second, field))])
    np.testing.assert_array_equal(got, np.asarray(getattr(whole, field)), err_msg=field)
  for field in ("logp", "value"):
    got = np.concatenate([np.asarray(getattr(first, field)), np.asarray(getattr(second, field))])
    np.testing.assert_allclose(got, np.asarray(getattr(whole, field)), atol=1e-5, err_msg=field)
  np.testing.assert_allclose(np.asarray(boot), np.asarray(boot_whole), atol=1e-5)
  with pytest.raises(ValueError, match="continue_episodes=True needs start="):
    cont(model, pool, n, jax.random.key(0), mask_table)


def test_evaluation_with_text_prefix_cache_is_unchanged(assets):
  """Same results and the same actions at every step with the text cached once as with the whole prompt."""
  from gea_jax import eval as ev
  _, ctx, model = _setup(assets, "full")
  actions = []
  for greedy in (True, False):
    runs = []
    for prefix in (True, False):
      actions.append([])
      runs.append(ev.evaluate_embodiment(model, ctx, "grid_goto", num_episodes=4, split="heldout_seed", seed=3,
                                         greedy=greedy, text_prefix=prefix,
                                         on_step=lambda t, states, action, live: actions[-1].append(np.asarray(action))))
    assert runs[0] == runs[1], (greedy, runs)
    a, b = actions[-2], actions[-1]
    assert len(a) == len(b) > 1 and len(np.unique(np.stack(a))) > 1  # the policy does not act constantly
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def _flat(model, filt=nnx.Param):
  return {str(k): np.array(v) for k, v in nnx.to_flat_state(nnx.state(model, filt))}


def test_frozen_llm_mode_changes_only_the_adapters(assets):
  """LLaRP: the LLM stays bitwise unchanged; vision/projector/state/value parameters train."""
  mode = "frozen"
  config, ctx, model = _setup(assets, "full")
  config.ppo.train_mode = mode
  wrt, _ = ppo.prepare_model(model, config)
  before = _flat(model)
  trainable = set(_flat(model, wrt))
  learner = ppo.VlmPPO(config.ppo, ctx, model, wrt, ["grid_goto"], seed=0)
  assert model.vlm.vision_encoder.loop_gradients  # the update's convolution gradients run as im2col matmuls
  donated = jax.tree.leaves((learner.params, learner.opt_state))
  m = learner.iteration(0)
  assert np.isfinite(m["loss"])
  # the update donated the trained copy's buffers and Adam's; the model object's arrays (the reference policy) live
  assert all(x.is_deleted() for x in donated)
  assert not any(x.is_deleted() for x in jax.tree.leaves(nnx.state(model)))
  after = _flat(learner.sync())
  learner.update(1, *learner.collect(1)[:2])  # sync gave the model copies: the next donation leaves them alone
  assert not any(x.is_deleted() for x in jax.tree.leaves(nnx.state(model)))
  assert set(before) == set(after)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed and changed <= trainable
  frozen_llm = [k for k in before if "llm" in k and k not in trainable]
  assert frozen_llm and not changed & set(frozen_llm)
  assert any("value_head" in k for k in changed)
  assert not any("llm" in k for k in trainable)


@pytest.mark.parametrize("trunk_grad", [0.0, 1.0])
def test_lora_value_mode_and_value_trunk_grad(assets, trunk_grad):
  """PPO's "lora_value": only the LoRA adapters and the value head may change (the vision encoder, projector, state
  encoder and embedding table stay bitwise as SFT left them). With no policy signal (a batch without reward, no
  entropy bonus, no KL), only the value loss trains: the adapters move iff ``ppo.value_trunk_grad`` > 0."""
  config, ctx, model = _setup(assets, "full")
  p = config.ppo
  p.train_mode, p.value_warmup_iterations, p.value_trunk_grad = "lora_value", 0, trunk_grad
  p.entropy_coef, p.kl_coef, p.skip_flat_reward = 0.0, 0.0, True
  wrt, mode = ppo.prepare_model(model, config)
  assert mode == "lora_value"
  before = _flat(model)
  trainable = set(_flat(model, wrt))
  assert trainable and all("lora" in k or "value_head" in k for k in trainable)
  learner = ppo.VlmPPO(p, ctx, model, wrt, ["grid_goto"], seed=0)
  trajs, boots, _ = learner.collect(0)
  assert not np.any(np.asarray(trajs[0].reward)), "precondition: no reward in the batch (no policy signal)"
  assert np.isfinite(learner.update(0, trajs, boots)["loss"])
  after = _flat(learner.sync())
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed <= trainable and any("value_head" in k for k in changed)
  assert any("lora" in k for k in changed) == (trunk_grad > 0)


def test_lora_fixed_embeddings_mode_keeps_the_embedding_table(assets):
  """PPO's "lora_fixed_embeddings": "lora" without the embedding table (the agent's tied output head): the adapters
  and the non-LLM parts train, the table stays bitwise as SFT left it while "lora" moves it on the same batch."""
  moved = {}
  for mode in ("lora", "lora_fixed_embeddings"):
    config, ctx, model = _setup(assets, "full", history=1)
    p = config.ppo
    p.train_mode, p.value_warmup_iterations, p.skip_flat_reward = mode, 0, False
    wrt, got = ppo.prepare_model(model, config)
    assert got == mode
    before = _flat(model)
    trainable = set(_flat(model, wrt))
    learner = ppo.VlmPPO(p, ctx, model, wrt, ["grid_goto"], seed=0)
    assert np.isfinite(learner.iteration(0)["loss"])
    after = _flat(learner.sync())
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed <= trainable and any("lora_b" in k for k in changed) and any("llm" not in k for k in changed)
    moved[mode] = {k for k in changed if "embed_tokens" in k}
    assert bool(moved[mode]) == (mode == "lora"), (mode, sorted(moved[mode]))
    if mode == "lora_fixed_embeddings":
      assert not any("embed_tokens" in k for k in trainable)


def test_value_warmup_iterations_train_only_the_value_head(assets):
  """During ``ppo.value_warmup_iterations`` the policy is untouched; afterwards the LoRA adapters train too."""
  config, ctx, model = _setup(assets, "full", history=1)
  config.ppo.train_mode = "lora"
  config.ppo.value_warmup_iterations = 1
  wrt, _ = ppo.prepare_model(model, config)
  learner = ppo.VlmPPO(config.ppo, ctx, model, wrt, EMBODIMENTS, seed=0)
  before = _flat(model)
  m0 = learner.iteration(0)
  assert np.isfinite(m0["loss"])
  # the policy is the SFT policy throughout the warm-up: its entropy on each body's rows is the reference's
  assert learner.p.kl_coef > 0
  for name in EMBODIMENTS:
    assert m0[f"{name}/entropy"] > 0
    np.testing.assert_allclose(m0[f"{name}/entropy"], m0[f"{name}/ref_entropy"], rtol=1e-5)
  np.testing.assert_allclose(m0["ref_entropy"], np.mean([m0[f"{n}/ref_entropy"] for n in EMBODIMENTS]), rtol=1e-5)
  assert m0["reacher/ref_entropy"] != m0["grid_goto/ref_entropy"]
  # ... and the update re-scores the collected sequences (built from the trajectories) as the collector scored them
  assert m0["approx_kl"] < 1e-8 and m0["clip_fraction"] == 0, (m0["approx_kl"], m0["clip_fraction"])
  warm = _flat(learner.sync())
  changed = {k for k in before if not np.array_equal(before[k], warm[k])}
  assert changed and all("value_head" in k for k in changed), sorted(changed)
  m1 = learner.iteration(1)
  after = _flat(learner.sync())
  changed = {k for k in warm if not np.array_equal(warm[k], after[k])}
  assert any("lora_b" in k for k in changed) and any("value_head" in k for k in changed)
  assert m1["kl_to_sft"] > 0  # the policy moved: the KL to SFT is split over the bodies' rows
  np.testing.assert_allclose(m1["kl_to_sft"], np.mean([m1[f"{n}/kl_to_sft"] for n in EMBODIMENTS]), rtol=1e-4)


def test_update_batch_rows_hold_their_own_transition_and_a_step_raises_the_surrogate(assets):
  """The update's rows (env-major over both bodies) carry each collected transition's own action ids, old log-prob
  and GAE advantage; one full-batch gradient step then raises sum(adv * (new - old log-prob)) on those rows
  (a sign error in the objective, or advantages paired with other rows' actions, fails it)."""
  from gea_jax import sharding
  config, ctx, model = _setup(assets, "full", history=1)
  p = config.ppo
  p.train_mode, p.kl_coef, p.entropy_coef, p.skip_flat_reward = "lora", 0.0, 0.0, False
  p.num_epochs, p.num_minibatches, p.lr, p.unroll_length = 1, 1, 1e-4, 3
  wrt, _ = ppo.prepare_model(model, config)
  learner = ppo.VlmPPO(p, ctx, model, wrt, EMBODIMENTS, seed=0)
  trajs, boots, _ = learner.collect(0)
  with sharding.use_mesh(learner.mesh, learner.rules):
    data = jax.device_get(jax.jit(learner.batch_rows)(trajs, boots))
  n, T, E = int(p.num_envs), int(p.unroll_length), len(EMBODIMENTS)
  slots = ctx.layout.slots()
  for i, (traj, boot) in enumerate(zip(trajs, boots)):
    adv, _ = ppo.embodiment_advantages(p, traj.reward, traj.value, boot, traj.termination, traj.truncation)
    tpa = ctx.vocab.tokens_per_action(learner.ids[i])
    for env in range(n):
      for t in range(T):
        r = (env * E + i) * T + t
        assert data["embodiment_id"][r] == learner.ids[i]
        np.testing.assert_allclose(data["old_logp"][r], traj.logp[t, env], rtol=1e-6)
        np.testing.assert_allclose(data["adv"][r], adv[t, env], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(data["targets"][r][slots["logit_pos"]][:tpa], traj.tokens[t, env][:tpa])
  assert np.std(data["adv"]) > 0.5
  old = jnp.asarray(data["old_logp"])
  learner.update(0, trajs, boots)
  scored = {k: jnp.asarray(v) for k, v in data.items()}
  logp_tok = action_scores(learner.sync(), ctx.layout, scored, learner.mask_table,
                           candidate_ids=candidate_ids(ctx.vocab.mask_table))[0]
  new = jnp.sum(logp_tok * scored["token_valid"], 1)
  gain = float(jnp.mean(scored["adv"] * (new - old)))
  assert gain > 0 and float(jnp.max(jnp.abs(new - old))) > 1e-5, gain


@pytest.mark.parametrize("sft_coef,critic", [(0.0, "privileged"), (0.5, "policy")])
def test_lora_ppo_on_grid_goto_changes_only_lora_and_resumes_exactly(assets, tmp_path, sft_coef, critic):
  """GEA default: a full-SFT agent gets LoRA adapters for PPO; base LLM weights stay bitwise unchanged.

  Runs the embedded default's layout (k=1: no history frames, so some trajectory leaves are empty); with
  sft_coef > 0 (joint SFT + RL) the expert-data iterator is part of the checkpoint, so resume stays exact; with the
  privileged critic its parameters and Adam state are (a critic restarted from its initialization would give other
  advantages, so other parameters). Runs over the config's mesh (all 8 fake devices on "data"): the checkpoint holds
  sharded arrays."""
  config, ctx, model = _setup(assets, "full", history=1)
  assert ctx.layout.history == 0
  config.ppo.train_mode, config.ppo.critic = "lora", critic
  config.ppo.sft_coef = sft_coef
  config.ppo.sft_batch_size = 8
  # the joint-loss case also decays the learning rate: the schedule's step count is resumed with Adam's state
  config.ppo.lr_decay = "linear" if sft_coef else "constant"
  config.ppo.num_envs, config.ppo.unroll_length = 8, 2  # one env per device
  config.data.data_dir = assets["data_dir"]
  res = ppo.train(config, str(tmp_path / "full"), model, ctx, ["grid_goto"])
  before = _flat(_setup(assets, "full", history=1)[2])
  after = _flat(res.model)
  changed = {k for k in after if k not in before or not np.array_equal(before[k], after[k])}
  # the privileged critic replaces the agent's value head, which then does not train
  assert any("lora_b" in k for k in changed) and any("value_head" in k for k in changed) == (critic == "policy")
  base_llm = [k for k in before if "llm" in k and "embed_tokens" not in k]
  assert base_llm and not changed & set(base_llm)
  assert res.iterations == 2
  value_loss = "value_loss" if critic == "policy" else "critic/value_loss"
  for k in ("loss", "policy_loss", value_loss, "entropy", "kl_to_sft", "approx_kl", "grid_goto/value_explained_variance") \
      + (("sft_loss",) if sft_coef else ()):
    assert np.isfinite(res.final_metrics[k]), k
  assert ("sft_loss" in res.final_metrics) == bool(sft_coef)
  assert res.final_metrics["entropy"] > 0
  assert res.final_metrics["grid_goto/episodes"] >= 0
  assert len(res.curves["ppo/loss"]) == 2
  assert len(res.curves["ppo/perf/env_steps_per_second"]) == 2
  for k in ("perf/collect_seconds", "perf/update_seconds", "perf/env_steps_per_second"):
    assert res.final_metrics[k] > 0, k
  busy = res.final_metrics["perf/collect_seconds"] + res.final_metrics["perf/update_seconds"]
  np.testing.assert_allclose(res.final_metrics["perf/env_steps_per_second"], 8 * 2 / busy, rtol=1e-6)
  # stopped after iteration 1 (the joint-loss case: preempted by a real SIGTERM, which saves that iteration and
  # stops; the other: a copy of the run without its last checkpoint, a run killed outright); the rerun resumes from
  # that checkpoint and reaches the same parameters bit for bit
  part = tmp_path / "part"
  if sft_coef:
    sigterm = lambda it, metrics: os.kill(os.getpid(), signal.SIGTERM)
    stopped = ppo.train(config, str(part), _setup(assets, "full", history=1)[2], ctx, ["grid_goto"], callback=sigterm)
    assert stopped.preempted and stopped.iterations == 1 and not res.preempted
    assert ppo.saved_iterations(config, str(part)) == [1]
  else:
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "ppo" / "checkpoints" / "2")
  _, _, model2 = _setup(assets, "full", history=1)
  res2 = ppo.train(config, str(part), model2, ctx, ["grid_goto"])
  assert res2.iterations == 2 and not res2.preempted
  a, b = _flat(res.model), _flat(res2.model)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # an earlier checkpoint's policy loads into a fresh starting agent (how sft_vs_ppo.py evaluates the last few)
  assert ppo.saved_iterations(config, str(tmp_path / "full")) == [1, 2]
  fresh = _setup(assets, "full", history=1)[2]
  first = _flat(ppo.load_checkpoint(config, str(tmp_path / "full"), fresh, 1))
  last = _flat(ppo.load_checkpoint(config, str(tmp_path / "full"), fresh, 2))
  assert last.keys() == a.keys()
  for k in a:
    np.testing.assert_array_equal(last[k], a[k], err_msg=k)
  lora_b = [k for k in a if "lora_b" in k]
  assert any(not np.array_equal(first[k], a[k]) for k in lora_b)  # iteration 1 is not iteration 2's policy
  assert any(np.any(first[k] != 0) for k in lora_b)  # nor the start's (LoRA B starts at zero)
  with pytest.raises(CheckpointError, match=r"checkpoint step 5: .*does not exist \(steps: \[1, 2\]\)"):
    ppo.load_checkpoint(config, str(tmp_path / "full"), fresh, 5)


def test_joint_sft_without_expert_data_is_a_clear_error(assets):
  config, ctx, model = _setup(assets, "full", history=1)
  config.ppo.sft_coef = 0.5
  wrt, _ = ppo.prepare_model(model, config)
  with pytest.raises(ValueError, match="sft_coef"):
    ppo.VlmPPO(config.ppo, ctx, model, wrt, ["grid_goto"])


def test_validate_names_the_bad_key():
  from gea_jax.config_validation import ConfigError
  c = _config()
  c.sft.tokenizer_artifact, c.data.data_dir = "artifact", "data"
  c.ppo.num_minibatches = 3  # 1 embodiment x 2 envs x 4 steps = 8 transitions
  with pytest.raises(ConfigError, match="ppo.num_minibatches"):
    ppo.validate(c)
  c.ppo.num_minibatches, c.ppo.value_trunk_grad = 2, 1.5
  with pytest.raises(ConfigError, match=r"ppo.value_trunk_grad: must be in \[0.0, 1.0\]"):
    ppo.validate(c)
  c.ppo.value_trunk_grad, c.ppo.value_lr = 0.0, -1e-3
  with pytest.raises(ConfigError, match="ppo.value_lr: must be >= 0"):
    ppo.validate(c)
  c.ppo.value_lr, c.ppo.critic = 0.0, "oracle"
  with pytest.raises(ConfigError, match="ppo.critic: must be one of"):
    ppo.validate(c)
  c.ppo.critic, c.ppo.critic_hidden = "privileged", (64, 0)
  with pytest.raises(ConfigError, match="ppo.critic_hidden: must be a non-empty tuple"):
    ppo.validate(c)
  c.ppo.critic_hidden, c.ppo.critic_epochs = (64,), 0
  with pytest.raises(ConfigError, match="ppo.critic_epochs: must be an int > 0"):
    ppo.validate(c)
  c.ppo.critic_epochs, c.ppo.critic_lr = 8, float("nan")
  with pytest.raises(ConfigError, match="ppo.critic_lr: must be a finite number > 0"):
    ppo.validate(c)
  c.ppo.critic_lr = 3e-4
  # the learner reads them through the same check; a config from before these keys gets the defaults
  assert ppo.critic_fit_settings(c.ppo) == (3e-4, 8)
  assert ppo.critic_fit_settings(ml_collections.ConfigDict({"critic": "privileged"})) == (1e-3, 8)


def test_sft_embodiments_choose_the_expert_batch_and_are_validated(assets):
  """``ppo.sft_embodiments`` names the bodies of the joint SFT loss's expert batch ("" = all the agent knows); a body
  the agent does not know is refused naming the key, in ``validate`` and where the learner's iterator is built."""
  from gea_jax.config_validation import ConfigError
  from gea_jax.train import sft
  config, ctx, _ = _setup(assets, "full", history=1)
  assert ppo.sft_embodiment_names(config.ppo, list(ctx.names)) == list(ctx.names)
  config.ppo.sft_embodiments = "reacher"
  names = ppo.sft_embodiment_names(config.ppo, list(ctx.names))
  assert names == ["reacher"]
  batch = next(sft.make_iterator(config, ctx, assets["data_dir"], names, batch_size=8, seed=1))
  assert set(np.unique(batch["embodiment_id"]).tolist()) == {ctx.index("reacher")}
  config.sft.tokenizer_artifact, config.data.data_dir = "artifact", "data"
  config.ppo.sft_coef, config.ppo.sft_embodiments = 0.5, "reacher,halfcheetah"
  with pytest.raises(ConfigError, match="ppo.sft_embodiments: names a body the agent does not know.*'halfcheetah'"):
    ppo.validate(config)
  with pytest.raises(ConfigError, match="ppo.sft_embodiments"):
    ppo.sft_embodiment_names(config.ppo, list(ctx.names))


def test_joint_sft_batch_per_step_gives_each_adam_step_its_own_expert_batch(assets):
  """``ppo.sft_batch_per_step`` (default): the update draws num_epochs x num_minibatches expert batches, one per
  Adam step. Fed the same batch for every step it equals the one-batch-per-iteration update (so the batches reach
  the loss where the single batch did); fed distinct batches it differs from that, and it consumed one per step."""
  from gea_jax.train import sft
  config, ctx, _ = _setup(assets, "full", history=1)
  p = config.ppo
  p.train_mode, p.sft_coef, p.sft_batch_size, p.value_warmup_iterations = "lora", 0.5, 4, 0
  p.num_epochs, p.num_minibatches = 2, 2
  it = sft.make_iterator(config, ctx, assets["data_dir"], list(ctx.names), batch_size=4, seed=1)
  batches = [next(it) for _ in range(5)]

  def updated(per_step: bool, feed: list, trajs=None):
    _, _, model = _setup(assets, "full", history=1)
    p.sft_batch_per_step = per_step
    wrt, _ = ppo.prepare_model(model, config)
    feed_it = iter(feed)
    learner = ppo.VlmPPO(p, ctx, model, wrt, ["grid_goto"], seed=0, sft_iterator=feed_it)
    if trajs is None:
      trajs = learner.collect(0)[:2]
    metrics = learner.update(1, *trajs)
    return _flat(learner.sync()), metrics, trajs, feed_it

  single, m_single, trajs, _ = updated(False, batches[:1])
  same, m_same, _, _ = updated(True, batches[:1] * 4, trajs)
  for k in single:
    np.testing.assert_allclose(same[k], single[k], rtol=1e-4, atol=2e-6, err_msg=k)  # float rounding via Adam
  np.testing.assert_allclose(m_same["sft_loss"], m_single["sft_loss"], rtol=1e-5)
  # <body>/sft_loss: each body's mean over its action tokens; weighted by those tokens they make the batch's loss
  loss_mask = batches[0]["loss_mask"][:, np.asarray(ctx.layout.slots()["logit_pos"])]
  tokens = {n: float(loss_mask[batches[0]["embodiment_id"] == ctx.index(n)].sum()) for n in ctx.names}
  assert all(tokens.values()) and {f"{n}/sft_loss" for n in ctx.names} == {k for k in m_single if k.endswith("/sft_loss")}
  combined = sum(tokens[n] * m_single[f"{n}/sft_loss"] for n in ctx.names) / sum(tokens.values())
  np.testing.assert_allclose(combined, m_single["sft_loss"], rtol=1e-5)
  fresh, m_fresh, _, rest = updated(True, batches, trajs)
  assert next(rest) is batches[4]  # four batches drawn, one per Adam step
  moved = max(float(np.max(np.abs(fresh[k] - single[k]))) for k in single if "lora" in k)
  assert moved > 1e-4, moved
  assert m_fresh["sft_loss"] != m_single["sft_loss"]
  config.sft.tokenizer_artifact, config.data.data_dir = "artifact", "data"
  del p.sft_batch_per_step  # ConfigDict's type safety refuses an int here; a config built otherwise may not
  p.sft_batch_per_step = 1
  from gea_jax.config_validation import ConfigError
  with pytest.raises(ConfigError, match="ppo.sft_batch_per_step: must be of type bool"):
    ppo.validate(config)


def test_grad_accum_takes_one_step_on_the_mean_gradient():
  """``ppo.grad_accum`` k: the first k-1 minibatches' updates are zero and the k-th is the plain optimizer's step on
  the mean of the k gradients; its state places on a mesh like Adam's; k must divide ``ppo.num_minibatches``."""
  from gea_jax import sharding
  from gea_jax.config_validation import ConfigError
  p = ppo.ppo_defaults()
  p.lr, p.grad_clip = 1e-2, 1.0
  params = {"w": jnp.arange(6.0).reshape(2, 3), "value_head": {"b": jnp.ones(3)}}
  g1 = jax.tree.map(lambda x: jnp.full_like(x, 0.3), params)
  g2 = jax.tree.map(lambda x: jnp.linspace(-2.0, 1.0, x.size).reshape(x.shape), params)
  plain = ppo.make_optimizer(p)
  want, _ = plain.update(jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), plain.init(params), params)
  p.grad_accum = 2
  tx = ppo.make_optimizer(p)
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  state = ppo.place_opt_state(tx, tx.init(params), params, mesh)
  first, state = tx.update(g1, state, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(first))
  second, _ = tx.update(g2, state, params)
  for a, b in zip(jax.tree.leaves(second), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  c = _config()
  c.sft.tokenizer_artifact, c.data.data_dir = "artifact", "data"
  c.ppo.num_minibatches, c.ppo.grad_accum = 2, 3
  with pytest.raises(ConfigError, match="ppo.grad_accum: must divide ppo.num_minibatches"):
    ppo.validate(c)
  with pytest.raises(ConfigError, match="ppo.grad_accum: must divide ppo.num_minibatches"):
    ppo.make_optimizer(c.ppo)  # also when the learner is built without ppo.validate
  c.ppo.grad_accum = 0
  with pytest.raises(ConfigError, match="ppo.grad_accum: must be a positive int"):
    ppo.make_optimizer(c.ppo)


@pytest.mark.parametrize("decay", ["constant", "linear", "cosine"])
def test_lr_decay_shrinks_adams_steps_to_zero_over_the_run(decay):
  """Under a constant gradient Adam's bias-corrected step is exactly its learning rate: step t of a run of
  ``iterations x num_epochs x num_minibatches / grad_accum`` Adam steps is lr, lr (1 - t / T) or lr (1 + cos(pi t / T))
  / 2; the checkpointed optimizer state places on a mesh; an unknown ``ppo.lr_decay`` is refused naming it."""
  from gea_jax import sharding
  from gea_jax.config_validation import ConfigError
  p = ppo.ppo_defaults()
  p.lr, p.lr_decay, p.grad_clip = 1e-2, decay, 0.0
  p.iterations, p.num_epochs, p.num_minibatches, p.grad_accum = 3, 2, 4, 2  # T = 12 Adam steps
  params = {"w": jnp.zeros((2, 3))}
  tx = ppo.make_optimizer(p)
  state = ppo.place_opt_state(tx, tx.init(params), params, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  grads = {"w": jnp.full((2, 3), 0.5)}
  steps = []
  for _ in range(2 * 12):  # MultiSteps: one Adam step per grad_accum gradients
    updates, state = tx.update(grads, state, params)
    steps.append(float(jnp.max(jnp.abs(updates["w"]))))
  taken = np.asarray(steps[1::2])
  t = np.arange(12)
  want = {"constant": np.full(12, 1e-2), "linear": 1e-2 * (1 - t / 12),
          "cosine": 1e-2 * (1 + np.cos(np.pi * t / 12)) / 2}[decay]
  np.testing.assert_allclose(taken, want, rtol=1e-5, atol=1e-9)
  c = _config()
  c.sft.tokenizer_artifact, c.data.data_dir = "artifact", "data"
  c.ppo.lr_decay = "exponential"
  with pytest.raises(ConfigError, match="ppo.lr_decay: must be one of constant, linear, cosine"):
    ppo.validate(c)


@pytest.mark.parametrize("value_lr", [0.0, 1e-2])
def test_value_lr_sets_the_value_heads_own_step_size(value_lr):
  """Adam's first step moves every parameter by its learning rate: the value head's by ``ppo.value_lr`` when it is
  > 0 (else by ``ppo.lr``), everything else by ``ppo.lr``."""
  from gea_jax.models.value_head import ValueHead

  class Tiny(nnx.Module):
    def __init__(self):
      self.value_head = ValueHead(4, 3, rngs=nnx.Rngs(0))
      self.proj = nnx.Linear(4, 4, rngs=nnx.Rngs(1))

  p = ppo.ppo_defaults()
  p.lr, p.value_lr, p.grad_clip = 1e-4, value_lr, 1.0
  params = nnx.state(Tiny(), nnx.Param)
  tx = ppo.make_optimizer(p)
  grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  steps = jax.tree_util.tree_map_with_path(lambda path, u: (ppo.is_value_head_path(path), np.abs(np.asarray(u))),
                                           updates)
  seen = set()
  for in_value_head, step in jax.tree.leaves(steps, is_leaf=lambda x: isinstance(x, tuple)):
    seen.add(in_value_head)
    want = (value_lr or p.lr) if in_value_head else p.lr
    np.testing.assert_allclose(step, want, rtol=1e-3)
  assert seen == {True, False}


def test_run_starts_from_the_sft_checkpoint(assets, tmp_path):
  """`run` (the CLI trainer) loads the SFT run's weights: PPO's frozen base equals the SFT model's."""
  from gea_jax.train import sft
  config = _config("full")
  config.sft.steps, config.sft.checkpoint_every = 2, 2
  res_sft = sft.train(config, str(tmp_path / "sft_run"), artifact_dir=assets["artifact"], data_dir=assets["data_dir"])
  config.sft.tokenizer_artifact, config.data.data_dir = assets["artifact"], assets["data_dir"]
  config.ppo.sft_workdir = str(tmp_path / "sft_run")
  config.ppo.train_mode = "lora"
  config.ppo.iterations = 1
  config.ppo.num_envs, config.ppo.unroll_length = 8, 2  # split over the config's mesh (8 fake devices)
  res = ppo.run(config, str(tmp_path / "ppo_run"))
  assert res.iterations == 1 and np.isfinite(res.final_metrics["loss"])
  fresh = _flat(_setup(assets, "full")[2])
  a, b = _flat(res_sft.model), _flat(res.model)
  base = [k for k in a if "llm" in k and "embed_tokens" not in k]
  assert any(not np.array_equal(a[k], fresh[k]) for k in base)  # SFT moved them, so the check is not vacuous
  for k in base:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _sharded_config():
  """grid_goto, 8 envs (one per fake device), 2 steps."""
  config = _config("lora")
  config.ppo.num_envs = 8
  config.ppo.unroll_length = 2
  config.ppo.reset_pool = 1
  config.ppo.num_minibatches = 2  # 8 x 2 = 16 transitions: minibatches of 8
  # Adam's first steps move each parameter by about lr * g / (|g| + eps), so where a gradient is near zero the
  # meshes' different reduction orders can change that ratio: at lr=1e-2 one projector weight (of 1024) differed by
  # 3e-5 once the default state token became an MLP; at lr=1e-3 one embedding weight (of 1.6M) differed by 1.12e-5 on
  # a clean clone in session 22 (another CPU than CI's, where it passed); lr=1e-4 keeps such differences ~10x under
  # the 1e-5 tolerance, while a wrong update still moves parameters by up to a step (~1e-4)
  config.ppo.lr = 1e-4
  return config


@pytest.mark.parametrize("critic,shapes", [("policy", ((1, 1, 1), (8, 1, 1), (2, 4, 1))),
                                           ("privileged", ((1, 1, 1), (8, 1, 1)))])
def test_one_iteration_on_the_mesh_equals_single_device(assets, critic, shapes):
  """Collection + update on 8 fake devices ((8,1,1): envs over "data"; (2,4,1): params over "fsdp" too) = on one:
  the same sampled actions, parameters and metrics; every array is laid out on the mesh and each jitted call
  compiles once. The privileged critic (replicated, fitted on rows split over "data") gives the same critic
  parameters and metrics too."""
  from jax.sharding import PartitionSpec as P

  from gea_jax import sharding
  from gea_jax.train import sft
  config = _sharded_config()
  config.ppo.critic = critic
  ctx = load_context(config, assets["artifact"], assets["data_dir"], EMBODIMENTS)
  names = ppo.embodiment_names(config)
  runs = []
  for shape in shapes:
    devices = jax.devices()[:1] if shape == (1, 1, 1) else jax.devices()
    mesh, rules = sft.mesh_and_rules(config, sharding.make_mesh(shape, devices))
    ppo.validate_mesh(config, mesh)
    model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size, seed=1)
    wrt, _ = ppo.prepare_model(model, config)
    learner = ppo.VlmPPO(config.ppo, ctx, model, wrt, names, seed=0, mesh=mesh, rules=rules)
    start = _flat(learner.sync(), wrt)
    trajs, boots, stats = learner.collect(0)
    metrics = learner.update(0, trajs, boots)
    envs = ("data", "fsdp")
    assert trajs[0].tokens.sharding.spec == P(None, envs) and boots[0].sharding.spec == P(envs)
    if shape == (2, 4, 1):  # frozen LLM weights and trainable embeddings split over fsdp; Adam moments alike
      assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(learner.rest))
      split = [(k, x) for k, x in nnx.to_flat_state(learner.params) if "fsdp" in str(x.sharding.spec)]
      assert split
      mu = dict(nnx.to_flat_state(learner.opt_state[-1][0].mu))
      assert all(mu[k].sharding == x.sharding for k, x in split)
    runs.append(dict(tokens=[np.asarray(t.tokens) for t in trajs], logp=[np.asarray(t.logp) for t in trajs],
                     value=[np.asarray(t.value) for t in trajs], metrics={**metrics, **stats},
                     params=_flat(learner.sync(), wrt), start=start,
                     critic=_critic_flat(learner)))
    if shape == (2, 4, 1):  # a second iteration reuses both programs
      learner.iteration(1)
      assert learner._update._cache_size() == 1
      assert all(c._cache_size() == 1 for c in learner._collect)
  ref = runs[0]
  assert any(len(np.unique(t)) > 1 for t in ref["tokens"])  # the policy samples varied actions
  # the update moved parameters by ~lr (Adam's first step), well past the 1e-5 tolerance below: not vacuous
  assert max(np.abs(v - ref["start"][k]).max() for k, v in ref["params"].items()) > 5e-5
  for run in runs[1:]:
    for a, b in zip(ref["tokens"], run["tokens"]):
      np.testing.assert_array_equal(a, b)
    for k in ("logp", "value"):
      for a, b in zip(ref[k], run[k]):
        np.testing.assert_allclose(a, b, atol=1e-5, err_msg=k)
    assert ref["metrics"].keys() == run["metrics"].keys()
    for k, v in ref["metrics"].items():
      np.testing.assert_allclose(v, run["metrics"][k], atol=1e-5, rtol=1e-5, err_msg=k)
    for k, v in ref["params"].items():
      np.testing.assert_allclose(v, run["params"][k], atol=1e-5, err_msg=k)
    assert ref["critic"].keys() == run["critic"].keys()
    for k, v in ref["critic"].items():
      np.testing.assert_allclose(v, run["critic"][k], atol=1e-5, err_msg=f"critic {k}")
  if critic == "privileged":
    assert ref["critic"] and "critic/value_loss" in ref["metrics"]


def _critic_flat(learner) -> dict[str, np.ndarray]:
  """The privileged critic's parameters and Adam state as flat host arrays ({} without one)."""
  if learner.critic_state is None:
    return {}
  leaves = jax.tree_util.tree_leaves_with_path(learner.critic_state)
  return {jax.tree_util.keystr(k): np.asarray(x) for k, x in leaves}


def test_num_envs_must_split_over_the_mesh():
  from gea_jax import sharding
  from gea_jax.config_validation import ConfigError
  config = _sharded_config()
  mesh = sharding.make_mesh((2, 4, 1))
  config.ppo.num_envs = 4
  with pytest.raises(ConfigError, match="ppo.num_envs: must be divisible by the data\\*fsdp mesh size 8"):
    ppo.validate_mesh(config, mesh)
  config.ppo.num_envs, config.ppo.num_minibatches = 8, 2  # minibatches of 8 x 2 / 2 = 8: fine; / 4 = 4: not
  ppo.validate_mesh(config, mesh)
  config.ppo.num_minibatches = 4
  with pytest.raises(ConfigError, match="ppo.num_minibatches: the minibatch of 4 transitions"):
    ppo.validate_mesh(config, mesh)
  # the end-to-end pipeline checks it against the config's mesh (mesh.shape over the 8 devices) before it starts
  from gea_jax.train import pipeline
  config = _sharded_config()
  config.ppo.num_envs = 6
  with pytest.raises(ConfigError, match="ppo.num_envs: must be divisible by the data\\*fsdp mesh size 8"):
    pipeline.validate(config)


def test_flat_reward_batches_give_no_policy_signal():
  """A sparse-reward batch without a single reward: normalized GAE would be value error blown up to unit scale;
  with ppo.skip_flat_reward its advantages are zero (the value targets stay), with one reward they are normal."""
  p = ppo.ppo_defaults()
  T, N = 6, 3
  rng = np.random.default_rng(0)
  value = jnp.asarray(rng.normal(0.0, 0.05, (T, N)), jnp.float32)  # an untrained value head's noise
  boot = jnp.asarray(rng.normal(0.0, 0.05, (N,)), jnp.float32)
  term = trunc = jnp.zeros((T, N), bool)
  flat = jnp.zeros((T, N), jnp.float32)
  adv, target = ppo.embodiment_advantages(p, flat, value, boot, term, trunc)
  np.testing.assert_array_equal(np.asarray(adv), 0.0)
  p_off = ppo.ppo_defaults()
  p_off.skip_flat_reward = False
  adv_off, target_off = ppo.embodiment_advantages(p_off, flat, value, boot, term, trunc)
  assert np.isclose(float(jnp.std(adv_off)), 1.0, atol=1e-3)  # the noise, normalized to unit scale
  np.testing.assert_allclose(np.asarray(target), np.asarray(target_off))  # the value head still learns
  one = flat.at[2, 1].set(1.0)
  adv_one, _ = ppo.embodiment_advantages(p, one, value, boot, term, trunc)
  assert np.isclose(float(jnp.std(adv_one)), 1.0, atol=1e-3) and float(adv_one[2, 1]) > 1.0


def test_time_limit_cut_or_terminal():
  """An episode that hits its time limit without reward: "cut" gives its last step no TD error (the chain stops
  there, no signal); "terminal" ends it with no further reward, so its last steps get the hand-computed negative
  advantages; the other env's steps (no time limit) are the same under both."""
  p = ppo.ppo_defaults()
  p.normalize_advantage, p.skip_flat_reward = False, False
  g, lam = float(p.discount), float(p.gae_lambda)
  value = jnp.asarray([[0.5, 0.2], [0.5, 0.3], [0.5, 0.4]], jnp.float32)  # [T=3, N=2]
  boot = jnp.asarray([0.9, 0.6], jnp.float32)  # env 0: a new episode's first value after the reset
  reward = jnp.zeros((3, 2), jnp.float32)
  term = jnp.zeros((3, 2), bool)
  trunc = term.at[2, 0].set(True)  # env 0 hits its time limit at the last step
  p.time_limit = "cut"
  cut, _ = ppo.embodiment_advantages(p, reward, value, boot, term, trunc)
  p.time_limit = "terminal"
  end, target = ppo.embodiment_advantages(p, reward, value, boot, term, trunc)
  d1 = g * 0.5 - 0.5  # TD error of steps 0 and 1 of env 0
  np.testing.assert_allclose(np.asarray(cut[:, 0]), [d1 + g * lam * d1, d1, 0.0], atol=1e-6)
  a2 = -0.5  # nothing after the time limit
  a1 = d1 + g * lam * a2
  np.testing.assert_allclose(np.asarray(end[:, 0]), [d1 + g * lam * a1, a1, a2], atol=1e-6)
  np.testing.assert_allclose(np.asarray(target[:, 0]), np.asarray(end[:, 0]) + 0.5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(end[:, 1]), np.asarray(cut[:, 1]), atol=1e-7)
  from gea_jax.config_validation import ConfigError
  c = _config()
  c.sft.tokenizer_artifact, c.data.data_dir = "artifact", "data"
  c.ppo.time_limit = "bootstrap"
  with pytest.raises(ConfigError, match="ppo.time_limit: must be one of"):
    ppo.validate(c)


def test_privileged_critic_features_rollout_advantages_and_update(assets):
  """``ppo.critic = "privileged"``: the collector records each step's privileged features (the state the action was
  taken in, and the next one after any auto-reset); GAE and ``old_value`` use the critic's values of them; an update
  fits the critic to the value targets (its loss on the batch falls) and leaves the agent's value head untouched."""
  from gea_jax import sharding
  from gea_jax.rl.privileged_critic import feature_dim, privileged_features, symlog
  grid = registry.make("grid_goto")
  st = grid.reset(jax.random.key(3))
  f = privileged_features(grid)(st)
  assert f.shape == (feature_dim(grid),) and bool(jnp.all(jnp.isfinite(f)))
  np.testing.assert_allclose(f[-1], symlog(-grid.shaping_potential(st)), rtol=1e-6)  # the actions left to the target
  reacher = registry.make("reacher")
  assert privileged_features(reacher)(reacher.reset(jax.random.key(3))).shape == (feature_dim(reacher),)

  config, ctx, model = _setup(assets, "full", history=1)
  p = config.ppo
  p.train_mode, p.critic, p.unroll_length = "lora", "privileged", 6
  wrt, _ = ppo.prepare_model(model, config)
  learner = ppo.VlmPPO(p, ctx, model, wrt, EMBODIMENTS, seed=0)
  trajs, boots, _ = learner.collect(0)
  for traj, name in zip(trajs, EMBODIMENTS):
    assert traj.critic_obs.shape == (6, 2, feature_dim(registry.make(name)))
    np.testing.assert_array_equal(traj.next_critic_obs[:-1], traj.critic_obs[1:])
    assert float(jnp.std(traj.critic_obs[:, :, :-1])) > 0
  for i, traj in enumerate(trajs):  # the bootstrap's features are those of the episodes left running
    final = jax.vmap(privileged_features(learner.envs[i]))(learner.episodes[i].env_state)
    np.testing.assert_allclose(traj.next_critic_obs[-1], final, rtol=1e-6)
  critic0 = jax.tree.map(np.array, learner.critic_state[0])
  batch = jax.jit(learner.batch_rows)
  with sharding.use_mesh(learner.mesh, learner.rules):
    data = jax.device_get(batch(trajs, boots, learner.critic_state[0]))
  n, T, E = int(p.num_envs), int(p.unroll_length), len(EMBODIMENTS)
  for i, traj in enumerate(trajs):
    value = learner.critic_value(learner.critic_state[0], traj.critic_obs, i)
    boot = learner.critic_value(learner.critic_state[0], traj.next_critic_obs[-1], i)
    adv, _ = ppo.embodiment_advantages(p, traj.reward, value, boot, traj.termination, traj.truncation)
    for env in range(n):
      rows = (env * E + i) * T + np.arange(T)
      np.testing.assert_allclose(data["old_value"][rows], value[:, env], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(data["adv"][rows], adv[:, env], rtol=1e-5, atol=1e-5)
  head_before = {k: v for k, v in _flat(model).items() if "value_head" in k}
  m = learner.update(0, trajs, boots)
  assert "value_loss" not in m and np.isfinite(m["critic/value_loss"])
  for name, e in zip(EMBODIMENTS, learner.ids):  # of the critic's values before the update, per body
    rows = data["embodiment_id"] == e
    ev = 1.0 - np.var(data["target"][rows] - data["old_value"][rows]) / np.var(data["target"][rows])
    np.testing.assert_allclose(m[f"{name}/value_explained_variance"], ev, rtol=1e-4, atol=1e-5)
  head_after = {k: v for k, v in _flat(learner.sync()).items() if "value_head" in k}
  assert head_before and all(np.array_equal(head_before[k], head_after[k]) for k in head_before)

  def critic_loss(params):
    v = nnx.merge(learner.critic_graphdef, params)(jnp.asarray(data["critic_x"]))
    return float(jnp.mean(jnp.square(v - data["target"])))
  assert critic_loss(learner.critic_state[0]) < 0.9 * critic_loss(critic0)

