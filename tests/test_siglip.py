"""SigLIP vision tower: parity with transformers' SiglipVisionModel (random tiny weights) and strict import."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gea_jax.interop.siglip import load_siglip_vision  # noqa: E402
from gea_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel  # noqa: E402

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=24,
            patch_size=8, layer_norm_eps=1e-6)


def _randomise(model):
  """HF initialises biases / LayerNorms to 0 / 1: perturb everything so that each tensor matters."""
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=g))
  return model


@pytest.fixture(scope="module")
def hf_vision(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.SiglipVisionConfig(**TINY)
  model = _randomise(transformers.SiglipVisionModel(config)).eval()
  path = tmp_path_factory.mktemp("siglip_vision")
  model.save_pretrained(path)
  return model, path


def _compare(hf_model, jax_model, rng=0):
  x = np.random.default_rng(rng).standard_normal((2, 24, 24, 3)).astype(np.float32)
  with torch.no_grad():
    ref = hf_model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2)))
  out = jax_model(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(), atol=1e-4, rtol=1e-4)
  if ref.pooler_output is None:
    assert out.pooler_output is None
  else:
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
  return out


def test_vision_model_parity(hf_vision):
  hf_model, path = hf_vision
  model = load_siglip_vision(path)
  assert model.config.image_hw == (24, 24) and model.config.grid == (3, 3)
  out = _compare(hf_model, model)
  assert out.pooler_output.shape == (2, 32)
  feats = model.features(jnp.zeros((1, 24, 24, 3)))
  assert feats.shape == (1, 3, 3, 32)


def test_without_head_and_exact_gelu(tmp_path):
  torch.manual_seed(1)
  config = transformers.SiglipVisionConfig(**{**TINY, "vision_use_head": False, "hidden_act": "gelu"})
  hf_model = _randomise(transformers.SiglipVisionModel(config)).eval()
  hf_model.save_pretrained(tmp_path)
  model = load_siglip_vision(tmp_path)
  assert model.head is None
  _compare(hf_model, model, rng=1)


def test_full_siglip_model_directory(tmp_path):
  """The vision part of a SiglipModel (text tower + logit scale present in the file) loads and matches."""
  torch.manual_seed(2)
  config = transformers.SiglipConfig(
    vision_config=TINY, text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=64, bos_token_id=1, eos_token_id=2))
  full = _randomise(transformers.SiglipModel(config)).eval()
  full.save_pretrained(tmp_path)
  model = load_siglip_vision(tmp_path)
  _compare(full.vision_model, model, rng=2)


def test_jit_and_bfloat16(hf_vision):
  _, path = hf_vision
  model32 = load_siglip_vision(path)
  model16 = load_siglip_vision(path, dtype=jnp.bfloat16)
  assert model16.encoder.layers[0].mlp.fc1.kernel[...].dtype == jnp.bfloat16
  x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 24, 24, 3)), jnp.float32)
  f32 = nnx.jit(lambda m, x: m(x).last_hidden_state)(model32, x)
  b16 = nnx.jit(lambda m, x: m(x).last_hidden_state)(model16, x.astype(jnp.bfloat16))
  assert b16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(b16, np.float32), np.asarray(f32), atol=0.15, rtol=0.05)


def _rewrite(src, dst, edit):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(str(src / "model.safetensors"))
  edit(tensors)
  dst.mkdir(exist_ok=True)
  save_file(tensors, str(dst / "model.safetensors"))
  (dst / "config.json").write_text((src / "config.json").read_text())
  return dst


def test_strict_keys(hf_vision, tmp_path):
  _, path = hf_vision
  bad = _rewrite(path, tmp_path / "missing", lambda t: t.pop("encoder.layers.1.mlp.fc2.bias"))
  with pytest.raises(ValueError, match=r"missing tensor\(s\) encoder\.layers\.1\.mlp\.fc2\.bias"):
    load_siglip_vision(bad)
  bad = _rewrite(path, tmp_path / "extra", lambda t: t.update(extra_tensor=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match=r"unexpected tensor\(s\) extra_tensor"):
    load_siglip_vision(bad)

  def wrong_shape(t):
    t["encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
  bad = _rewrite(path, tmp_path / "shape", wrong_shape)
  with pytest.raises(ValueError, match=r"q_proj\.weight'.*\(32, 31\).*\(32, 32\)"):
    load_siglip_vision(bad)


def test_bad_directories(hf_vision, tmp_path):
  _, path = hf_vision
  with pytest.raises(FileNotFoundError, match="config.json"):
    load_siglip_vision(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_vision_model"}))
  with pytest.raises(ValueError, match="config.json.*clip_vision_model"):
    load_siglip_vision(tmp_path)
  cfg = json.loads((path / "config.json").read_text())
  cfg["num_attention_heads"] = 5
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match="num_attention_heads=5"):
    load_siglip_vision(tmp_path)
  cfg["num_attention_heads"] = 4
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    load_siglip_vision(tmp_path)


def test_wrong_image_shape_is_clear():
  model = SiglipVisionModel(SiglipVisionConfig(**{**TINY, "image_size": 16}), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"expected images \[batch, 16, 16, 3\].*\(1, 3, 16, 16\)"):
    model(jnp.zeros((1, 3, 16, 16)))


def test_sharded_forward_equals_single_device(hf_vision):
  from gea_jax import sharding
  _, path = hf_vision
  model = load_siglip_vision(path)
  x = jnp.asarray(np.random.default_rng(4).standard_normal((8, 24, 24, 3)), jnp.float32)
  ref = model(x).last_hidden_state
  mesh = sharding.make_mesh((2, 4, 1))
  sharding.shard_module(model, mesh)
  assert model.encoder.layers[0].mlp.fc1.kernel[...].sharding.spec[0] == "fsdp"
  with sharding.use_mesh(mesh):
    out = nnx.jit(lambda m, x: m(x).last_hidden_state)(model, sharding.shard_batch(x, mesh))
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5, rtol=1e-5)
  assert jax.device_count() == 8


def test_export_round_trip(hf_vision, tmp_path):
  from gea_jax.interop.siglip import save_siglip_vision
  _, path = hf_vision
  model = load_siglip_vision(path)
  save_siglip_vision(model, tmp_path / "out")
  reloaded = transformers.SiglipVisionModel.from_pretrained(tmp_path / "out").eval()
  _compare(reloaded, model, rng=5)
  again = load_siglip_vision(tmp_path / "out")
  for (p1, a), (p2, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
    assert p1 == p2
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
