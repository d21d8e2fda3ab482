"""LoRA: zero-B identity, merge/unmerge, trainable filters for grads and optimizer state, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gea_jax.models.llm import CausalLM, LlmConfig
from gea_jax.models.lora import (
  LoraConfig,
  LoraParam,
  apply_lora,
  merge_lora,
  merged_copy,
  merged_param_arrays,
  remove_lora,
  trainable_filter,
  unmerge_lora,
)

CFG = LlmConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2)
IDS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)), jnp.int32)


def _model(lora=None, seed=0):
  model = CausalLM(CFG, rngs=nnx.Rngs(seed))
  if lora is not None:
    apply_lora(model, lora, nnx.Rngs(seed + 1))
  return model


def _randomize_b(model, seed=2):
  state = nnx.state(model, LoraParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [jax.random.normal(k, x.shape, x.dtype) * 0.1 for k, x in zip(keys, leaves)]
  nnx.update(model, jax.tree.unflatten(tree, new))


def test_zero_b_equals_base_model():
  base = _model()(IDS)
  lora = _model(LoraConfig(rank=4, alpha=8.0))
  n_adapters = len(nnx.to_flat_state(nnx.state(lora, LoraParam)))
  assert n_adapters == 2 * 7 * CFG.num_hidden_layers
  np.testing.assert_array_equal(np.asarray(lora(IDS)), np.asarray(base))
  a = lora.layers[0].self_attn.q_proj.lora
  assert a.lora_a.shape == (32, 4, ) and a.lora_b.shape == (4, 4, 8) and float(jnp.abs(a.lora_a[...]).max()) > 0


def test_adapter_changes_output_and_merge_equals_unmerged():
  model = _model(LoraConfig(rank=4, alpha=8.0))
  base = np.asarray(_model()(IDS))
  _randomize_b(model)
  unmerged = np.asarray(model(IDS))
  assert np.abs(unmerged - base).max() > 1e-2  # the adapters really act
  k0 = np.asarray(model.layers[1].mlp.down_proj.kernel[...])
  exported = merged_param_arrays(model)  # merge into a copy: the live module is untouched
  np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.down_proj.kernel[...]), k0)
  merge_lora(model)
  assert model.layers[0].self_attn.q_proj.lora.merged
  np.testing.assert_allclose(np.asarray(model(IDS)), unmerged, atol=1e-5, rtol=0)
  np.testing.assert_allclose(exported[("layers", 1, "mlp", "down_proj", "kernel")],
                             np.asarray(model.layers[1].mlp.down_proj.kernel[...]), atol=1e-7)
  merge_lora(model)  # idempotent
  np.testing.assert_allclose(np.asarray(model(IDS)), unmerged, atol=1e-5, rtol=0)
  unmerge_lora(model)
  np.testing.assert_allclose(np.asarray(model.layers[1].mlp.down_proj.kernel[...]), k0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(model(IDS)), unmerged, atol=1e-5, rtol=0)
  remove_lora(model)
  assert model.layers[0].self_attn.q_proj.lora is None
  assert not nnx.state(model, LoraParam)
  np.testing.assert_allclose(np.asarray(model(IDS)), unmerged, atol=1e-5, rtol=0)


def test_merged_copy_folds_adapters_into_a_copy_and_leaves_the_model_alone():
  model = _model(LoraConfig(rank=4, alpha=8.0))
  _randomize_b(model)
  unmerged = np.asarray(model(IDS))
  proj = model.layers[1].mlp.down_proj
  k0 = np.asarray(proj.kernel[...])
  copy = merged_copy(model)
  cproj = copy.layers[1].mlp.down_proj
  assert cproj.lora.merged and not proj.lora.merged
  np.testing.assert_array_equal(np.asarray(proj.kernel[...]), k0)  # the model is untouched
  np.testing.assert_allclose(np.asarray(cproj.kernel[...]), k0 + np.asarray(proj.lora.delta()), atol=1e-6)
  np.testing.assert_allclose(np.asarray(copy(IDS)), unmerged, atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(model(IDS)), unmerged, atol=0, rtol=0)
  assert merged_copy(copy) is copy  # nothing left to fold
  plain = _model()
  assert merged_copy(plain) is plain
  graphdef, state = nnx.split(model)  # inside jit (a rollout call folds once per call)
  traced = jax.jit(lambda st: merged_copy(nnx.merge(graphdef, st))(IDS))(state)
  np.testing.assert_allclose(np.asarray(traced), unmerged, atol=1e-5, rtol=0)
  assert not model.layers[0].self_attn.q_proj.lora.merged


def test_target_modules_subset():
  model = _model(LoraConfig(rank=2, target_modules=("q_proj", "v_proj")))
  layer = model.layers[0]
  assert layer.self_attn.q_proj.lora is not None and layer.self_attn.v_proj.lora is not None
  assert layer.self_attn.k_proj.lora is None and layer.mlp.up_proj.lora is None
  with pytest.raises(ValueError, match="already has a LoRA adapter"):
    apply_lora(model, LoraConfig(rank=2, target_modules=("q_proj",)), nnx.Rngs(0))


def _loss(model, ids):
  logits = model(ids[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def test_lora_filter_grads_and_optimizer_state_only_for_adapters():
  model = _model(LoraConfig(rank=4))
  _randomize_b(model)
  wrt = trainable_filter("lora")
  grads = nnx.grad(_loss, argnums=nnx.DiffState(0, wrt))(model, IDS)
  grad_paths = {tuple(p) for p, _ in nnx.to_flat_state(grads)}
  lora_paths = {tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model, LoraParam))}
  assert grad_paths == lora_paths
  assert all(float(jnp.abs(g.get_value()).max()) > 0 for _, g in nnx.to_flat_state(grads))

  opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=wrt)
  opt_leaves = jax.tree.leaves(nnx.state(opt, nnx.OptState))
  n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoraParam)))
  assert sum(x.size for x in opt_leaves if x.ndim) == 2 * n_lora  # adam mu + nu (scalars: step counts)
  base_before = {tuple(p): np.asarray(v.get_value()) for p, v in
                 nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoraParam))))}

  @nnx.jit
  def step(model, opt, ids):
    loss, g = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, wrt))(model, ids)
    opt.update(model, g)
    return loss

  losses = [float(step(model, opt, IDS)) for _ in range(3)]
  assert losses[-1] < losses[0]
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoraParam)))):
    np.testing.assert_array_equal(np.asarray(v.get_value()), base_before[tuple(p)])


def test_full_and_frozen_filters():
  model = _model(LoraConfig(rank=2))
  full = nnx.grad(_loss, argnums=nnx.DiffState(0, trainable_filter("full")))(model, IDS)
  n_all = len(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  assert len(nnx.to_flat_state(full)) == n_all
  frozen = nnx.grad(_loss, argnums=nnx.DiffState(0, trainable_filter("frozen")))(model, IDS)
  assert len(nnx.to_flat_state(frozen)) == 0
  with pytest.raises(ValueError, match="unknown mode 'adapters'"):
    trainable_filter("adapters")


@pytest.mark.parametrize("rank", [0, -3])
def test_bad_rank_is_an_error(rank):
  with pytest.raises(ValueError, match="LoraConfig.rank must be a positive int"):
    LoraConfig(rank=rank)


def test_bad_target_is_an_error():
  with pytest.raises(ValueError, match="unknown module 'qkv'"):
    LoraConfig(target_modules=("qkv",))
