"""HF interop: load transformers checkpoints, export back (LoRA merged), round trips, strict key errors."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from gea_jax.interop import hf  # noqa: E402
from gea_jax.models.llm import CausalLM  # noqa: E402
from gea_jax.models.lora import LoraConfig, LoraParam, apply_lora  # noqa: E402

VOCAB = 96


def _hf_model(arch, seed=0, **kw):
  torch.manual_seed(seed)
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
  base.update(kw)
  if arch == "llama":
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base))
  else:
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**base))
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0, 0.2) if p.ndim > 1 or name.endswith("bias") else p.uniform_(0.5, 1.5)
  return model.eval()


def _ids(b=2, s=9, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (b, s)).astype(np.int64)


def _torch_logits(model, ids):
  with torch.no_grad():
    return model(torch.tensor(ids)).logits.numpy()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("llama")
  model = _hf_model("llama", rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0})
  model.save_pretrained(d)
  return str(d), model


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
def test_load_hf_directory_matches_transformers(tmp_path, arch, tied):
  model = _hf_model(arch, tie_word_embeddings=tied)
  model.save_pretrained(tmp_path)
  jm = hf.load_causal_lm(tmp_path)
  assert isinstance(jm, CausalLM) and jm.config.architecture == arch
  ids = _ids()
  out = np.asarray(jm(jnp.asarray(ids, jnp.int32)))
  assert out.shape == (2, 9, VOCAB) and out.dtype == np.float32
  np.testing.assert_allclose(out, _torch_logits(model, ids), atol=1e-4, rtol=0)


def test_load_sharded_checkpoint(tmp_path):
  model = _hf_model("llama", seed=1)
  model.save_pretrained(tmp_path, max_shard_size="20KB")
  assert os.path.exists(tmp_path / hf.SAFETENSORS_INDEX)
  ids = _ids(seed=1)
  out = np.asarray(hf.load_causal_lm(tmp_path)(jnp.asarray(ids, jnp.int32)))
  np.testing.assert_allclose(out, _torch_logits(model, ids), atol=1e-4, rtol=0)


def test_bfloat16_checkpoint_loads(tmp_path):
  model = _hf_model("qwen2", seed=2).to(torch.bfloat16)
  model.save_pretrained(tmp_path)
  jm = hf.load_causal_lm(tmp_path, dtype=jnp.bfloat16)
  assert jm.layers[0].self_attn.q_proj.kernel.dtype == jnp.bfloat16
  ref = model.state_dict()["model.layers.0.self_attn.q_proj.weight"].float().numpy()
  got = np.asarray(jm.layers[0].self_attn.q_proj.kernel[...].astype(jnp.float32)).reshape(32, -1).T
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, arch):
  jm = CausalLM(hf.LlmConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, architecture=arch,
                             attention_bias=arch == "qwen2", tie_word_embeddings=arch == "llama",
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8}),
                rngs=nnx.Rngs(0))
  hf.save_causal_lm(jm, tmp_path)
  tm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  assert type(tm).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]
  assert tm.config.rope_parameters["rope_type"] == "llama3"
  ids = _ids(seed=3, s=20)
  np.testing.assert_allclose(_torch_logits(tm, ids), np.asarray(jm(jnp.asarray(ids, jnp.int32))), atol=1e-4, rtol=0)


def test_export_with_lora_merges_into_copy(tmp_path, llama_dir):
  path, _ = llama_dir
  jm = hf.load_causal_lm(path)
  apply_lora(jm, LoraConfig(rank=2, alpha=4.0), nnx.Rngs(0))
  for _, v in nnx.to_flat_state(nnx.state(jm, LoraParam)):
    v.set_value(jnp.full(v.shape, 0.05, v.dtype))
  ids = _ids(seed=4)
  expected = np.asarray(jm(jnp.asarray(ids, jnp.int32)))
  hf.save_causal_lm(jm, tmp_path)
  names = set(hf.read_safetensors(tmp_path / hf.SAFETENSORS))
  assert not any("lora" in n for n in names)
  tm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  np.testing.assert_allclose(_torch_logits(tm, ids), expected, atol=1e-4, rtol=0)
  # the live module still has its (unmerged) adapters
  assert jm.layers[0].self_attn.q_proj.lora is not None and not jm.layers[0].self_attn.q_proj.lora.merged
  np.testing.assert_array_equal(np.asarray(jm(jnp.asarray(ids, jnp.int32))), expected)


def test_import_export_import_is_identity(tmp_path, llama_dir):
  path, _ = llama_dir
  a = hf.load_causal_lm(path)
  hf.save_causal_lm(a, tmp_path)
  b = hf.load_causal_lm(tmp_path)
  assert a.config == b.config
  fa = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(a))}
  fb = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(b))}
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k])
  orig = hf.read_safetensors(os.path.join(path, hf.SAFETENSORS))
  again = hf.read_safetensors(tmp_path / hf.SAFETENSORS)
  assert orig.keys() == again.keys()
  for k in orig:
    np.testing.assert_array_equal(orig[k], again[k])


def _copy_with(tmp_path, src, tensors=None, config=None):
  os.makedirs(tmp_path, exist_ok=True)
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg.update(config or {})
  json.dump(cfg, open(tmp_path / "config.json", "w"))
  hf.write_safetensors(tmp_path / hf.SAFETENSORS, tensors if tensors is not None else
                       hf.read_safetensors(os.path.join(src, hf.SAFETENSORS)))
  return tmp_path


def test_missing_paths_are_named(tmp_path, llama_dir):
  with pytest.raises(FileNotFoundError, match="nope"):
    hf.load_causal_lm(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.load_causal_lm(tmp_path)
  with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
    hf.load_causal_lm(tmp_path / "missing.gguf")
  path, _ = llama_dir
  d = tmp_path / "noweights"
  d.mkdir()
  (d / "config.json").write_text(open(os.path.join(path, "config.json")).read())
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.load_causal_lm(d)


def test_unsupported_architecture_is_named(tmp_path, llama_dir):
  path, _ = llama_dir
  d = _copy_with(tmp_path, path, config={"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ValueError, match="config.json.*unsupported architecture.*GPT2LMHeadModel"):
    hf.load_causal_lm(d)


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path, llama_dir):
  path, _ = llama_dir
  sd = hf.read_safetensors(os.path.join(path, hf.SAFETENSORS))
  missing = {k: v for k, v in sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
  with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
    hf.load_causal_lm(_copy_with(tmp_path / "a", path, missing))
  extra = dict(sd, **{"model.layers.2.mlp.up_proj.weight": sd["model.layers.1.mlp.up_proj.weight"]})
  with pytest.raises(ValueError, match="unexpected tensor 'model.layers.2.mlp.up_proj.weight'"):
    hf.load_causal_lm(_copy_with(tmp_path / "b", path, extra))
  bad = dict(sd, **{"model.norm.weight": np.ones((33,), np.float32)})
  with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(33,\), expected \(32,\)"):
    hf.load_causal_lm(_copy_with(tmp_path / "c", path, bad))
  # a config with more layers than the checkpoint: the first absent tensor is named
  with pytest.raises(ValueError, match="missing tensor 'model.layers.2"):
    hf.load_causal_lm(_copy_with(tmp_path / "d", path, config={"num_hidden_layers": 3}))

