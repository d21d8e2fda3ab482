"""Action vocabulary: id layout, mixed-embodiment encode/decode, validity masks and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gea_jax.envs.spec import ActionSpace, EmbodimentSpec
from gea_jax.tokenizers.action_vocab import PAD_ID, ActionVocab, VocabLayout, build_vocab
from gea_jax.tokenizers.rvq import ActionTokenizer, RVQConfig

L, K, H = 2, 16, 2
LLM_VOCAB = 300


def _specs():
  return (
      EmbodimentSpec("arm2", ActionSpace("continuous", 2, (-1.0, -2.0), (1.0, 2.0))),
      EmbodimentSpec("grid", ActionSpace("discrete", 1, names=("left", "right", "forward"))),
      EmbodimentSpec("walker4", ActionSpace("continuous", 4, (-1.0,) * 4, (1.0,) * 4)),
      EmbodimentSpec("keys", ActionSpace("discrete", 1, names=("a", "b"))),
  )


@pytest.fixture(scope="module")
def vocab():
  tok = ActionTokenizer(RVQConfig(num_levels=L, codebook_size=K, chunk_len=H, hidden=32, latent_dim=8),
                        _specs(), rngs=nnx.Rngs(0))
  return build_vocab(tok, llm_vocab_size=LLM_VOCAB, mode="extend")


def _mixed_batch(rng):
  emb = np.array([0, 1, 2, 3, 2, 0], np.int32)
  a = np.zeros((len(emb), H, 4), np.float32)
  a[emb == 0, :, :2] = rng.uniform(-1, 1, (2, H, 2))
  a[emb == 2] = rng.uniform(-1, 1, (2, H, 4))
  a[1, :, 0] = [2, 0]
  a[3, :, 0] = [1, 1]
  return a, emb


def test_layout_extend_and_reuse_tail():
  ext = VocabLayout(_specs(), L, K, H, LLM_VOCAB, "extend")
  assert ext.num_ids == L * K + 3 + 2
  assert ext.first_id == LLM_VOCAB and ext.total_vocab_size == LLM_VOCAB + ext.num_ids
  tail = VocabLayout(_specs(), L, K, H, LLM_VOCAB, "reuse_tail")
  assert tail.first_id == LLM_VOCAB - tail.num_ids and tail.total_vocab_size == LLM_VOCAB
  assert VocabLayout.from_json(tail.to_json()) == tail
  with pytest.raises(ValueError, match="reuse_tail"):
    VocabLayout(_specs(), L, K, H, 20, "reuse_tail")
  with pytest.raises(ValueError, match="VocabLayout.mode"):
    VocabLayout(_specs(), L, K, H, LLM_VOCAB, "append")


def test_tokens_per_action_and_discrete_ids(vocab):
  assert vocab.tokens_per_action("arm2") == H * L
  assert vocab.tokens_per_action("grid") == H
  assert vocab.max_tokens == H * L
  assert list(vocab.discrete_ids("grid")) == [LLM_VOCAB + L * K + i for i in range(3)]
  assert list(vocab.discrete_ids("keys")) == [LLM_VOCAB + L * K + 3 + i for i in range(2)]
  with pytest.raises(ValueError, match="continuous"):
    vocab.discrete_ids("arm2")


def test_mixed_batch_encode_decode_shapes(vocab):
  a, emb = _mixed_batch(np.random.default_rng(0))
  ids = np.asarray(vocab.encode(a, emb))
  assert ids.shape == (len(emb), H * L) and ids.dtype == np.int32
  # discrete rows: their own ids for H actions, then PAD
  assert ids[1].tolist() == [LLM_VOCAB + L * K + 2, LLM_VOCAB + L * K + 0, PAD_ID, PAD_ID]
  assert ids[3].tolist() == [LLM_VOCAB + L * K + 3 + 1] * 2 + [PAD_ID, PAD_ID]
  # continuous rows: level l ids in [first + l*K, first + (l+1)*K)
  for r in (0, 2, 4, 5):
    for p in range(H * L):
      lo = LLM_VOCAB + (p % L) * K
      assert lo <= ids[r, p] < lo + K
  out = np.asarray(vocab.decode(ids, emb))
  assert out.shape == (len(emb), H, 4)
  np.testing.assert_array_equal(out[1, :, 0], [2, 0])
  np.testing.assert_array_equal(out[3, :, 0], [1, 1])
  assert np.all(out[0, :, 2:] == 0) and np.all(out[1, :, 1:] == 0)  # padded dims are zero
  # decoded continuous actions lie within their bounds
  assert np.all(np.abs(out[0, :, 0]) <= 1) and np.all(np.abs(out[0, :, 1]) <= 2)
  parts = vocab.split(out, emb)
  assert [p.shape for p in parts] == [(H, 2), (H, 1), (H, 4), (H, 1), (H, 4), (H, 2)]
  assert vocab.cut(out[:1], "arm2").shape == (1, H, 2)
  np.testing.assert_array_equal(np.asarray(vocab.token_mask(emb))[1], [True, True, False, False])


def test_single_embodiment_unpadded_and_jit_matches(vocab):
  rng = np.random.default_rng(1)
  a2 = rng.uniform(-1, 1, (5, H, 2)).astype(np.float32)
  ids = vocab.encode(a2, "arm2")
  padded = np.pad(a2, ((0, 0), (0, 0), (0, 2)))
  np.testing.assert_array_equal(ids, vocab.encode(padded, np.zeros(5, np.int32)))
  a, emb = _mixed_batch(rng)
  enc = jax.jit(lambda x, e: vocab.encode(x, e))
  dec = jax.jit(lambda i, e: vocab.decode(i, e))
  ids_j = enc(jnp.asarray(a), jnp.asarray(emb))
  np.testing.assert_array_equal(ids_j, vocab.encode(a, emb))
  np.testing.assert_allclose(dec(ids_j, jnp.asarray(emb)), vocab.decode(ids_j, emb), atol=1e-6)
  # decode of one embodiment's own token count
  assert vocab.decode(np.asarray(ids), "arm2").shape == (5, H, 4)


def test_valid_mask_admits_exactly_the_embodiments_ids(vocab):
  table = np.asarray(vocab.mask_table)
  assert table.shape == (4, H * L, vocab.total_vocab_size)
  for e, spec in enumerate(vocab.specs):
    for p in range(vocab.max_tokens):
      m = vocab.valid_mask(e, p)
      np.testing.assert_array_equal(m, table[e, p])
      admitted = set(np.nonzero(m)[0].tolist())
      if spec.action_space.is_continuous:
        lo = vocab.first_id + (p % L) * K
        assert admitted == set(range(lo, lo + K))
      elif p < H:
        assert admitted == set(vocab.discrete_ids(e))
      else:
        assert admitted == set()
  # nothing outside the reserved block is ever admitted, and every id of the block is admitted somewhere
  assert not table[..., : vocab.first_id].any()
  assert table.any(axis=(0, 1))[vocab.first_id:].all()
  # every encoded id passes the mask at its position
  a, emb = _mixed_batch(np.random.default_rng(2))
  ids = np.asarray(vocab.encode(a, emb))
  for r, e in enumerate(emb):
    for p in range(vocab.tokens_per_action(int(e))):
      assert table[e, p, ids[r, p]]


def test_reuse_tail_ids_round_trip():
  tok = ActionTokenizer(RVQConfig(num_levels=L, codebook_size=K, chunk_len=H, hidden=32, latent_dim=8),
                        _specs(), rngs=nnx.Rngs(0))
  ext = build_vocab(tok, llm_vocab_size=LLM_VOCAB, mode="extend")
  tail = build_vocab(tok, llm_vocab_size=LLM_VOCAB, mode="reuse_tail")
  a, emb = _mixed_batch(np.random.default_rng(3))
  ids_e, ids_t = np.asarray(ext.encode(a, emb)), np.asarray(tail.encode(a, emb))
  shift = ext.first_id - tail.first_id
  np.testing.assert_array_equal(np.where(ids_e >= 0, ids_e - shift, PAD_ID), ids_t)
  assert ids_t.max() < LLM_VOCAB
  np.testing.assert_allclose(tail.decode(ids_t, emb), ext.decode(ids_e, emb), atol=1e-6)


def test_bad_input_errors(vocab):
  a, emb = _mixed_batch(np.random.default_rng(4))
  with pytest.raises(ValueError, match="must have dimension 2"):
    vocab.encode(np.zeros((3, H, 3), np.float32), "arm2")
  with pytest.raises(ValueError, match="zero-padded to the max action dimension 4"):
    vocab.encode(np.zeros((3, H, 2), np.float32), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match=r"chunk_len=2"):
    vocab.encode(np.zeros((3, 4), np.float32), "arm2")
  with pytest.raises(ValueError, match="unknown embodiment 'hopper'"):
    vocab.encode(np.zeros((3, H, 2), np.float32), "hopper")
  with pytest.raises(ValueError, match="unknown embodiment id 7"):
    vocab.encode(a, np.array([0, 1, 2, 3, 7, 0], np.int32))
  with pytest.raises(ValueError, match=r"discrete action 5 of row 1 is out of range \[0, 3\) for embodiment 'grid'"):
    bad = a.copy()
    bad[1, 0, 0] = 5
    vocab.encode(bad, emb)
  ids = np.asarray(vocab.encode(a, emb))
  wrong = ids.copy()
  wrong[0, 1] = vocab.first_id  # a level-0 id at a level-1 position
  with pytest.raises(ValueError, match=r"token id .* at row 0, position 1 is outside the reserved ids"):
    vocab.decode(wrong, emb)
  wrong = ids.copy()
  wrong[1, 0] = 17  # a text token
  with pytest.raises(ValueError, match="of embodiment 'grid'"):
    vocab.decode(wrong, emb)
  with pytest.raises(ValueError, match="embodiment ids have batch"):
    vocab.decode(ids, emb[:3])
  with pytest.raises(ValueError, match="int array"):
    vocab.decode(ids.astype(np.float32), emb)
  # inside jit, out-of-block ids cannot raise: they are clamped into the block (finite, in bounds)
  out = jax.jit(lambda i, e: vocab.decode(i, e))(jnp.asarray(wrong), jnp.asarray(emb))
  assert np.all(np.isfinite(np.asarray(out)))


def test_vocab_requires_matching_tokenizer():
  tok = ActionTokenizer(RVQConfig(num_levels=L, codebook_size=K, chunk_len=H, hidden=32, latent_dim=8),
                        _specs(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="tokenizer is required"):
    ActionVocab(VocabLayout(_specs(), L, K, H, LLM_VOCAB), None)
  with pytest.raises(ValueError, match="differ from the layout"):
    ActionVocab(VocabLayout(_specs(), L, 2 * K, H, LLM_VOCAB), tok)
  only_discrete = build_vocab(None, _specs()[1:2], llm_vocab_size=10)
  ids = only_discrete.encode(np.array([[[2.0]]], np.float32), "grid")
  np.testing.assert_array_equal(ids, [[12]])
  np.testing.assert_array_equal(only_discrete.decode(ids, "grid"), [[[2.0]]])
