"""Decoder LLM: parity with transformers (Llama, Qwen2, RoPE variants), KV cache, dtypes, config, sharding."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from gea_jax import sharding  # noqa: E402
from gea_jax.interop.hf import causal_lm_from_state_dict  # noqa: E402
from gea_jax.models.llm import CausalLM, LlmConfig  # noqa: E402

VOCAB = 128


def hf_tiny(arch="llama", seed=0, **kw):
  """A tiny random transformers model with weights large enough that mistakes show in the logits."""
  torch.manual_seed(seed)
  base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=32)
  base.update(kw)
  if arch == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base))
  else:
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**base))
  model.eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim > 1:
        p.normal_(0, 0.15)
      else:
        p.uniform_(0.5, 1.5) if p.shape[0] == base["hidden_size"] and p.abs().max() == 1 else p.normal_(0, 0.3)
  return model


def to_jax(hf_model, **kw):
  sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
  return causal_lm_from_state_dict(hf_model.config.to_dict(), sd, **kw)


def hf_logits(hf_model, ids, mask=None, positions=None):
  with torch.no_grad():
    kw = {}
    if mask is not None:
      kw["attention_mask"] = torch.tensor(np.asarray(mask))
    if positions is not None:
      kw["position_ids"] = torch.tensor(np.asarray(positions))
    return hf_model(torch.tensor(np.asarray(ids)), **kw).logits.numpy()


def rand_ids(b, s, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (b, s)).astype(np.int32)


ROPES = {
  "default": None,
  "linear": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100.0},
  "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0},
  "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8, "rope_theta": 500.0},
  "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "rope_theta": 100.0},
}


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_llama_logits_match_transformers(rope):
  kw = {"rope_parameters": ROPES[rope]} if ROPES[rope] else {}
  # seq 40 > max_position_embeddings 32: dynamic NTK really rescales
  hf = hf_tiny("llama", max_position_embeddings=32, **kw)
  ids = rand_ids(2, 40)
  model = to_jax(hf)
  if rope != "default":
    assert model.config.rope_scaling.rope_type == rope
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_llama_bias_untied_and_custom_head_dim():
  hf = hf_tiny("llama", attention_bias=True, mlp_bias=True, head_dim=24, tie_word_embeddings=False,
               num_key_value_heads=1)
  ids = rand_ids(2, 12)
  model = to_jax(hf)
  assert model.config.head_dim == 24 and model.lm_head is not None
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_logits_match_transformers(tied):
  hf = hf_tiny("qwen2", tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  ids = rand_ids(3, 10, seed=1)
  model = to_jax(hf)
  assert model.config.architecture == "qwen2" and model.config.attention_bias
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_left_padding_matches_transformers_with_positions():
  hf = hf_tiny("llama")
  ids = rand_ids(2, 9)
  mask = np.ones((2, 9), np.int32)
  mask[1, :3] = 0  # row 1 left-padded by 3
  model = to_jax(hf)
  out = model.forward(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  ref = hf_logits(hf, ids, mask, positions)
  np.testing.assert_allclose(np.asarray(out.logits)[mask == 1], ref[mask == 1], atol=1e-4, rtol=0)
  # the padded row's real tokens equal the same tokens run alone
  alone = np.asarray(model(jnp.asarray(ids[1:, 3:])))
  np.testing.assert_allclose(np.asarray(out.logits)[1, 3:], alone[0], atol=1e-5, rtol=0)


def _decode(model, ids, mask, prompt_len, max_len=24):
  cache = model.init_cache(ids.shape[0], max_len)
  step = nnx.jit(lambda m, x, am, c: m.forward(x, attention_mask=am, cache=c))
  out = step(model, jnp.asarray(ids[:, :prompt_len]), jnp.asarray(mask[:, :prompt_len]), cache)
  logits = [np.asarray(out.logits)]
  cache = out.cache
  for t in range(prompt_len, ids.shape[1]):
    out = step(model, jnp.asarray(ids[:, t:t + 1]), jnp.asarray(mask[:, t:t + 1]), cache)
    cache = out.cache
    logits.append(np.asarray(out.logits))
  return np.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("rope", ["default", "llama3"])
def test_kv_cache_decoding_equals_full_forward(rope):
  kw = {"rope_parameters": ROPES[rope]} if ROPES[rope] else {}
  model = to_jax(hf_tiny("llama", **kw))
  ids = rand_ids(2, 11)
  mask = np.ones_like(ids)
  full = np.asarray(model(jnp.asarray(ids)))
  dec, cache = _decode(model, ids, mask, prompt_len=5)
  np.testing.assert_allclose(dec, full, atol=1e-5, rtol=0)
  assert int(cache.index) == 11 and cache.lengths.tolist() == [11, 11]
  assert cache.next_position.tolist() == [11, 11]


def test_kv_cache_left_padded_batch():
  model = to_jax(hf_tiny("qwen2", seed=3))
  ids = rand_ids(2, 10, seed=4)
  mask = np.ones_like(ids)
  mask[0, :4] = 0  # row 0: prompt of 2 real tokens after 4 pads
  dec, cache = _decode(model, ids, mask, prompt_len=6)
  full_row0 = np.asarray(model(jnp.asarray(ids[:1, 4:])))[0]
  full_row1 = np.asarray(model(jnp.asarray(ids[1:])))[0]
  np.testing.assert_allclose(dec[0, 4:], full_row0, atol=1e-5, rtol=0)
  np.testing.assert_allclose(dec[1], full_row1, atol=1e-5, rtol=0)
  assert cache.lengths.tolist() == [6, 10] and cache.next_position.tolist() == [6, 10]


def test_kv_cache_overflow_is_an_error():
  model = CausalLM(LlmConfig(), rngs=nnx.Rngs(0))
  cache = model.init_cache(1, 4)
  with pytest.raises(ValueError, match="KVCache overflow"):
    model.forward(jnp.zeros((1, 5), jnp.int32), cache=cache)


def test_inputs_embeds_and_embed():
  model = CausalLM(LlmConfig(), rngs=nnx.Rngs(1))
  ids = jnp.asarray(rand_ids(2, 6))
  a = model.forward(ids)
  b = model.forward(inputs_embeds=model.embed(ids))
  np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
  assert a.hidden_states.shape == (2, 6, 64) and a.logits.dtype == jnp.float32
  with pytest.raises(ValueError, match="exactly one"):
    model.forward(ids, inputs_embeds=model.embed(ids))


def test_bfloat16_compute_close_to_float32():
  hf = hf_tiny("llama")
  ids = jnp.asarray(rand_ids(2, 8))
  f32 = np.asarray(to_jax(hf)(ids))
  bf = to_jax(hf, compute_dtype=jnp.bfloat16)
  assert bf.config.dtype == "bfloat16" and bf.config.param_dtype == "float32"
  out = bf.forward(ids, cache=bf.init_cache(2, 8))
  assert out.cache.keys[0].dtype == jnp.bfloat16
  logits = np.asarray(out.logits)
  assert np.isfinite(logits).all()
  assert np.abs(logits - f32).max() < 0.1 * np.abs(f32).max()
  assert (logits.argmax(-1) == f32.argmax(-1)).mean() > 0.8


def test_remat_gives_same_gradients():
  cfg = LlmConfig(num_hidden_layers=2)
  ids = jnp.asarray(rand_ids(2, 6))
  grads = []
  for remat in (False, True):
    model = CausalLM(cfg.replace(remat=remat), rngs=nnx.Rngs(0))
    loss = lambda m: jnp.mean(jax.nn.log_softmax(m(ids))[..., 0])
    grads.append(nnx.grad(loss)(model))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_config_hf_round_trip_and_errors():
  hf = hf_tiny("llama", rope_parameters=ROPES["llama3"], tie_word_embeddings=True)
  cfg = LlmConfig.from_hf_dict(hf.config.to_dict())
  assert LlmConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
  assert cfg.num_params() == sum(p.numel() for n, p in hf.named_parameters())
  # transformers 4 layout: rope_theta + rope_scaling with "type"
  old = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
         "num_attention_heads": 2, "rope_theta": 123.0, "rope_scaling": {"type": "linear", "factor": 3.0}}
  c = LlmConfig.from_hf_dict(old)
  assert c.rope_theta == 123.0 and c.rope_scaling.rope_type == "linear" and c.num_key_value_heads == 2
  with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
    LlmConfig.from_hf_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, source="x/config.json")
  with pytest.raises(ValueError, match="rope_type.*longrope"):
    LlmConfig.from_hf_dict({**old, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
  with pytest.raises(ValueError, match="hidden_act"):
    LlmConfig.from_hf_dict({**old, "hidden_act": "gelu"})
  with pytest.raises(ValueError, match="num_key_value_heads"):
    LlmConfig(num_attention_heads=4, num_key_value_heads=3)
  with pytest.raises(ValueError, match="architecture"):
    LlmConfig(architecture="gpt2")
  with pytest.raises(ValueError, match="dtype"):
    LlmConfig(dtype="int8")


def test_params_carry_logical_axes():
  model = CausalLM(LlmConfig(), rngs=nnx.Rngs(0))
  axes = {tuple(p): v.get_metadata().get("out_sharding") for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert axes[("embed_tokens", "embedding")] == ("vocab", "embed")
  assert axes[("layers", 0, "self_attn", "q_proj", "kernel")] == ("embed", "heads", "head_dim")
  assert axes[("layers", 0, "self_attn", "k_proj", "kernel")] == ("embed", "kv_heads", "head_dim")
  assert axes[("layers", 1, "mlp", "down_proj", "kernel")] == ("mlp", "embed")
  assert all(a is not None for a in axes.values())


def test_sharded_params_and_forward():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (fake) devices from tests/conftest.py")
  cfg = LlmConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=8, head_dim=8)
  factory = lambda: CausalLM(cfg, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh((1, 8, 1))
  model = sharding.create_sharded(factory, mesh)
  per_dev = sharding.param_bytes_per_device(model)
  total = sum(x.nbytes for x in jax.tree.leaves(nnx.state(factory())))
  assert len(per_dev) == 8
  for b in per_dev.values():  # norm scales stay replicated: a few hundred bytes over total/8
    assert total / 8 <= b < total / 8 * 1.05
  q = model.layers[0].self_attn.q_proj.kernel.get_value()
  assert q.sharding.spec[0] == "fsdp"

  ids = jnp.asarray(rand_ids(8, 8))  # batch over data x fsdp = 8
  ref = np.asarray(factory()(ids))
  mesh2 = sharding.make_mesh((2, 4, 1))
  model2 = sharding.create_sharded(factory, mesh2)
  with sharding.use_mesh(mesh2):
    out = nnx.jit(lambda m, x: m(x))(model2, sharding.shard_batch(ids, mesh2))
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("min_rows", [0, 10**9])  # always fuse / never (few rows run the projections one by one)
def test_fused_projections_equal_separate(monkeypatch, min_rows):
  from gea_jax.models import llm as llm_mod
  monkeypatch.setattr(llm_mod, "FUSE_MIN_ROWS", min_rows)
  hf = hf_tiny("qwen2", seed=5)
  ids = jnp.asarray(rand_ids(2, 7))
  fused = to_jax(hf)
  sep = to_jax(hf, fuse_projections=False)
  assert fused.config.fuse_projections and not sep.config.fuse_projections
  np.testing.assert_allclose(np.asarray(fused(ids)), np.asarray(sep(ids)), atol=1e-5, rtol=0)


def test_fused_proj_runs_separately_below_the_row_threshold(monkeypatch):
  """Few rows: no concatenated kernel in the program (the copy costs more than the wider matmul saves)."""
  from gea_jax.models import llm as llm_mod
  cfg = LlmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
  model = llm_mod.CausalLM(cfg, rngs=nnx.Rngs(0))
  mlp = model.layers[0].mlp
  x = jnp.ones((2, 3, 32))
  hlo = lambda: str(jax.make_jaxpr(lambda x: llm_mod.fused_proj([mlp.gate_proj, mlp.up_proj], x))(x))
  assert "concatenate" not in hlo()
  monkeypatch.setattr(llm_mod, "FUSE_MIN_ROWS", 6)
  assert "concatenate" in hlo()


@pytest.mark.parametrize("fuse", [True, False])
def test_keep_last_gives_the_last_hidden_states_and_the_same_cache(fuse):
  """keep_last=k: the last layer runs queries / attention / MLP for the last k positions only; same numbers."""
  cfg = LlmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, fuse_projections=fuse)
  model = CausalLM(cfg, rngs=nnx.Rngs(1))
  ids = jnp.asarray(rand_ids(3, 9) % 64)
  mask = jnp.ones((3, 9), jnp.int32).at[0, :3].set(0)  # a left-padded row
  full = model.forward(ids, attention_mask=mask, cache=model.init_cache(3, 12))
  for k in (0, 1, 4):
    part = model.forward(ids, attention_mask=mask, cache=model.init_cache(3, 12), keep_last=k)
    assert part.hidden_states.shape == (3, k, 32) and part.logits.shape == (3, k, 64)
    np.testing.assert_allclose(np.asarray(part.hidden_states), np.asarray(full.hidden_states[:, 9 - k:]), atol=1e-5)
    for a, b in zip(jax.tree.leaves(part.cache), jax.tree.leaves(full.cache)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  nocache = model.forward(ids, attention_mask=mask, keep_last=2)
  np.testing.assert_allclose(np.asarray(nocache.hidden_states), np.asarray(full.hidden_states[:, 7:]), atol=1e-5)
  with pytest.raises(ValueError, match="keep_last=10"):
    model.forward(ids, keep_last=10)


def test_lm_logits_of_selected_ids():
  for tie in (True, False):
    cfg = LlmConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie)
    model = CausalLM(cfg, rngs=nnx.Rngs(2))
    h = jax.random.normal(jax.random.key(0), (2, 3, 32))
    ids = np.array([5, 63, 0, 17])
    np.testing.assert_allclose(np.asarray(model.lm_logits(h, ids)), np.asarray(model.lm_logits(h))[..., ids],
                               atol=1e-5)
