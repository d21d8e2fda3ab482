"""Decoder-only LLM of the Llama / Qwen2 families in Flax NNX (GQA, RoPE, RMSNorm, SwiGLU, KV cache).

Parameter names follow transformers' module tree (``embed_tokens``, ``layers[i].self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``norm``, ``lm_head``) so `gea_jax.interop.llm_weights` maps
them one to one; kernels are stored input-major with heads split out (q_proj: [embed, heads, head_dim])
and every parameter carries logical axis names for `gea_jax.sharding`.

    model = CausalLM(LlmConfig(...), rngs=nnx.Rngs(0))
    logits = model(input_ids)                                   # [batch, seq, vocab]
    out = model.forward(input_ids, attention_mask=m, cache=model.init_cache(b, 64))
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gea_jax.models.kv_cache import KVCache, update_layer
from gea_jax.models.llm_config import LlmConfig, RopeScaling
from gea_jax.models.rope import apply_rope, rope_cos_sin
from gea_jax.sharding import constrain

__all__ = ["CausalLM", "KVCache", "LlmConfig", "LlmOutput", "Proj", "RMSNorm", "RopeScaling"]

_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


class LlmOutput(NamedTuple):
  logits: jax.Array | None  # [batch, seq, vocab] float32
  hidden_states: jax.Array  # [batch, seq, embed] after the final norm
  cache: KVCache | None


class Proj(nnx.Module):
  """A linear map contracting ``in_shape`` into ``out_shape`` (kernel [*in_shape, *out_shape]).

  ``lora`` holds an optional low-rank adapter (see gea_jax.models.lora) whose output is added.
  """

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_axes: Sequence[str | None],
               out_axes: Sequence[str | None], *, use_bias: bool, dtype: str, param_dtype: str,
               rngs: nnx.Rngs, init_std: float = 0.02):
    self.in_shape = tuple(int(s) for s in in_shape)
    self.out_shape = tuple(int(s) for s in out_shape)
    self.in_axes = tuple(in_axes)
    self.out_axes = tuple(out_axes)
    self.dtype = dtype
    init = nnx.with_partitioning(nnx.initializers.normal(init_std), self.in_axes + self.out_axes)
    self.kernel = nnx.Param(init(rngs.params(), self.in_shape + self.out_shape, jnp.dtype(param_dtype)))
    if use_bias:
      binit = nnx.with_partitioning(nnx.initializers.zeros_init(), self.out_axes)
      self.bias = nnx.Param(binit(rngs.params(), self.out_shape, jnp.dtype(param_dtype)))
    else:
      self.bias = nnx.data(None)
    self.lora = nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = jnp.dtype(self.dtype)
    lead = x.shape[:x.ndim - len(self.in_shape)]
    k_in = math.prod(self.in_shape)
    # a plain 2-D matmul: XLA-CPU picks its fast GEMM path more reliably than for N-D tensordots
    y = jnp.dot(x.astype(dt).reshape(-1, k_in), self.kernel[...].astype(dt).reshape(k_in, -1))
    return self.add_bias_and_adapter(x, y.reshape(lead + self.out_shape))

  def add_bias_and_adapter(self, x: jax.Array, y: jax.Array) -> jax.Array:
    """y (the kernel product) + bias + the active LoRA adapter's output."""
    dt = jnp.dtype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(dt)
    if self.lora is not None and not self.lora.merged:
      y = y + self.lora(x).astype(dt)
    return y


# Fewer input rows (batch x tokens) than this: `fused_proj` runs the projections one by one. Concatenating the
# kernels copies them on every call (they are traced arguments, not constants), which costs as much as reading
# them again; with many rows (training: 4 x 256) the single wider matmul wins, with few (decoding: 8 rows per
# action token, 8 x 17 for a frame part) the copy dominates. Measured with an 8-layer SmolLM2-shaped LLM, batch 8,
# 2 loaded cores: 1 token 117 -> 34 ms, 17 tokens 192 -> 119 ms, 59 tokens 477 -> 398 ms per pass.
FUSE_MIN_ROWS = 1024


def fused_proj(projs: Sequence[Proj], x: jax.Array) -> list[jax.Array]:
  """Apply several projections that read the same input with one matmul (kernels concatenated).

  With fewer than `FUSE_MIN_ROWS` input rows each projection runs alone (same result, no kernel copy).
  """
  dt = jnp.dtype(projs[0].dtype)
  n = len(projs[0].in_shape)
  lead = x.shape[:x.ndim - n]
  if math.prod(lead) < FUSE_MIN_ROWS:
    return [p(x) for p in projs]
  k_in = math.prod(projs[0].in_shape)
  sizes = [math.prod(p.out_shape) for p in projs]
  kernel = jnp.concatenate([p.kernel[...].astype(dt).reshape(k_in, -1) for p in projs], axis=1)
  y = jnp.dot(x.astype(dt).reshape(-1, k_in), kernel)
  outs, start = [], 0
  for p, size in zip(projs, sizes):
    yi = y[:, start:start + size].reshape(lead + p.out_shape)
    outs.append(p.add_bias_and_adapter(x, yi))
    start += size
  return outs


class RMSNorm(nnx.Module):
  """HF LlamaRMSNorm: normalise in float32, scale by ``weight`` (here ``scale``)."""

  def __init__(self, dim: int, eps: float, *, dtype: str, param_dtype: str):
    self.eps = float(eps)
    self.dtype = dtype
    self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (xf.astype(jnp.dtype(self.dtype)) * self.scale[...].astype(jnp.dtype(self.dtype)))


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, dtype: str, param_dtype: str, rngs: nnx.Rngs):
    self.dtype = dtype
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))
    self.embedding = nnx.Param(init(rngs.params(), (vocab, dim), jnp.dtype(param_dtype)))

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(jnp.dtype(self.dtype))

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output projection: x [..., embed] -> float32 logits [..., vocab]."""
    dt = jnp.dtype(self.dtype)
    return jnp.einsum("...d,vd->...v", x.astype(dt), self.embedding[...].astype(dt),
                      preferred_element_type=jnp.float32)


class Attention(nnx.Module):
  def __init__(self, cfg: LlmConfig, rngs: nnx.Rngs):
    d, h, kv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
    self.dtype = cfg.dtype
    self.fuse = cfg.fuse_projections
    self.q_proj = Proj((d,), (h, hd), ("embed",), ("heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
    self.k_proj = Proj((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
    self.v_proj = Proj((d,), (kv, hd), ("embed",), ("kv_heads", "head_dim"), use_bias=cfg.attention_bias, **kw)
    self.o_proj = Proj((h, hd), (d,), ("heads", "head_dim"), ("embed",), use_bias=cfg.o_proj_bias, **kw)

  def __call__(self, x, cos, sin, mask, kv_cache=None, index=None, keep_last: int | None = None):
    """keep_last: outputs only for the last ``keep_last`` positions (keys / values of all are still made and
    cached; 0: only the cache update, output [b, 0, d])."""
    b, s = x.shape[:2]
    dt = jnp.dtype(self.dtype)
    if keep_last is not None:
      k, v = fused_proj([self.k_proj, self.v_proj], x) if self.fuse else (self.k_proj(x), self.v_proj(x))
      q = self.q_proj(x[:, s - keep_last:])
    elif self.fuse:
      q, k, v = fused_proj([self.q_proj, self.k_proj, self.v_proj], x)
    else:
      q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    k = constrain(k, ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    k = apply_rope(k, cos, sin)
    new_kv = None
    if kv_cache is not None:  # the cache is heads-major: k, v [b, kv_heads, t, hd]
      k, v = update_layer(kv_cache[0], kv_cache[1], k, v, index)
      new_kv = (k, v)
      k, v = k.astype(dt), v.astype(dt)
    else:
      k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if keep_last is not None:
      if keep_last == 0:
        return jnp.zeros((b, 0, x.shape[-1]), x.dtype), new_kv
      cos, sin, mask = cos[:, s - keep_last:], sin[:, s - keep_last:], mask[:, s - keep_last:]
      s = keep_last
    q = apply_rope(q, cos, sin)
    t = k.shape[2]
    kv, g, hd = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
    # GQA with the query groups folded into the rows: per KV head one [g*s, hd] x [hd, t] matmul.
    q = (q * jnp.asarray(hd ** -0.5, dt)).reshape(b, s, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * s, hd)
    scores = jnp.einsum("bkqd,bktd->bkqt", q, k, preferred_element_type=jnp.float32).reshape(b, kv, g, s, t)
    scores = jnp.where(mask[:, None, None, :, :], scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(b, kv, g * s, t)
    out = jnp.einsum("bkqt,bktd->bkqd", probs, v).reshape(b, kv, g, s, hd)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, s, self.num_heads, hd)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    return self.o_proj(out), new_kv


class MLP(nnx.Module):
  def __init__(self, cfg: LlmConfig, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kw = dict(use_bias=cfg.mlp_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
    self.gate_proj = Proj((d,), (f,), ("embed",), ("mlp",), **kw)
    self.up_proj = Proj((d,), (f,), ("embed",), ("mlp",), **kw)
    self.down_proj = Proj((f,), (d,), ("mlp",), ("embed",), **kw)
    self.fuse = cfg.fuse_projections

  def __call__(self, x):
    if self.fuse:
      gate, up = fused_proj([self.gate_proj, self.up_proj], x)
    else:
      gate, up = self.gate_proj(x), self.up_proj(x)
    h = jax.nn.silu(gate) * up
    return self.down_proj(constrain(h, ("batch", "length", "mlp")))


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: LlmConfig, rngs: nnx.Rngs):
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.self_attn = Attention(cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)

  def __call__(self, x, cos, sin, mask, kv_cache=None, index=None, keep_last: int | None = None):
    h, new_kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache, index, keep_last)
    if keep_last is not None:
      x = x[:, x.shape[1] - keep_last:]
    x = x + h
    x = x + self.mlp(self.post_attention_layernorm(x))
    return constrain(x, ("batch", "length", "embed")), new_kv


def _run_layer(layer, x, cos, sin, mask, kv_cache, index):
  return layer(x, cos, sin, mask, kv_cache, index)


_run_layer_remat = nnx.remat(_run_layer)


class CausalLM(nnx.Module):
  """Llama / Qwen2 causal LM; ``module(input_ids)`` -> float32 logits [batch, seq, vocab]."""

  def __init__(self, config: LlmConfig, *, rngs: nnx.Rngs):
    cfg = self.config = config
    kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
    self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
    if cfg.tie_word_embeddings:
      self.lm_head = nnx.data(None)
    else:
      self.lm_head = Proj((cfg.hidden_size,), (cfg.vocab_size,), ("embed",), ("vocab",), use_bias=False,
                          rngs=rngs, **kw)

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    return self.forward(input_ids).logits

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings [batch, seq, embed] in the compute dtype."""
    return constrain(self.embed_tokens(input_ids), ("batch", "length", "embed"))

  def lm_logits(self, hidden_states: jax.Array, ids=None) -> jax.Array:
    """Float32 logits [..., vocab] from final-norm hidden states.

    ids: optional static int array [C] of token ids: only their logits are computed ([..., C], the columns in
    that order); e.g. the action ids when sampling an action (a few hundred of the vocabulary's ~50k rows).
    """
    if ids is not None and self.lm_head is not None and self.lm_head.lora is not None:
      return jnp.take(self.lm_logits(hidden_states), jnp.asarray(ids, jnp.int32), axis=-1)  # adapted head: all
    if ids is not None:
      ids = jnp.asarray(ids, jnp.int32)
      dt = self.config.jnp_dtype
      if self.lm_head is None:
        w = jnp.take(self.embed_tokens.embedding[...], ids, axis=0).astype(dt)  # [C, embed]
      else:
        w = jnp.take(self.lm_head.kernel[...], ids, axis=1).T.astype(dt)
      logits = jnp.einsum("...d,cd->...c", hidden_states.astype(dt), w, preferred_element_type=jnp.float32)
      if self.lm_head is not None and self.lm_head.bias is not None:
        logits = logits + jnp.take(self.lm_head.bias[...], ids).astype(jnp.float32)
      return logits
    if self.lm_head is None:
      logits = self.embed_tokens.attend(hidden_states)
    else:
      logits = self.lm_head(hidden_states).astype(jnp.float32)
    return constrain(logits, ("batch", "length", "vocab")) if logits.ndim == 3 else logits

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    cfg = self.config
    return KVCache.create(cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim,
                          dtype=cfg.jnp_dtype if dtype is None else dtype)

  def forward(self, input_ids: jax.Array | None = None, *, inputs_embeds: jax.Array | None = None,
              positions: jax.Array | None = None, attention_mask: jax.Array | None = None,
              cache: KVCache | None = None, compute_logits: bool = True,
              keep_last: int | None = None) -> LlmOutput:
    """Run the decoder.

    Args:
      input_ids: int [batch, seq]; exactly one of input_ids / inputs_embeds.
      inputs_embeds: [batch, seq, embed] (e.g. image tokens spliced in by the VLM).
      positions: int [batch, seq] RoPE positions; default: running count of real tokens (so left
        padding gets the same positions as an unpadded row), continuing from the cache.
      attention_mask: [batch, seq], 1 = real token, 0 = padding; combined with causal masking.
      cache: a KVCache from `init_cache`; the new tokens are written to it and it is returned.
      compute_logits: False skips the vocab projection (logits=None), e.g. for a fused loss.
      keep_last: static int: hidden states (and logits) only of the last ``keep_last`` positions
        ([batch, keep_last, ...]); the last layer then computes its queries, attention and MLP for those
        positions only (every layer's keys / values still go to the cache). 0 with a cache: fill the cache only
        (e.g. a prompt prefix). None: all positions.
    """
    cfg = self.config
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("CausalLM.forward: pass exactly one of input_ids or inputs_embeds")
    if input_ids is not None:
      if input_ids.ndim != 2:
        raise ValueError(f"CausalLM.forward: input_ids must be [batch, seq], got shape {input_ids.shape}")
      x = self.embed(input_ids)
    else:
      if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != cfg.hidden_size:
        raise ValueError(f"CausalLM.forward: inputs_embeds must be [batch, seq, {cfg.hidden_size}], "
                         f"got shape {inputs_embeds.shape}")
      x = constrain(inputs_embeds.astype(cfg.jnp_dtype), ("batch", "length", "embed"))
    b, s = x.shape[:2]
    if attention_mask is None:
      mask = jnp.ones((b, s), bool)
    else:
      if attention_mask.shape != (b, s):
        raise ValueError(f"CausalLM.forward: attention_mask shape {attention_mask.shape} != {(b, s)}")
      mask = attention_mask.astype(bool)
    start = jnp.zeros((b,), jnp.int32) if cache is None else cache.next_position
    if positions is None:
      positions = start[:, None] + jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1
      positions = jnp.maximum(positions, start[:, None])
    positions = positions.astype(jnp.int32)
    cos, sin = rope_cos_sin(cfg, positions, cfg.jnp_dtype)

    if cache is None:
      idx = jnp.arange(s)
      attn_mask = mask[:, None, :] & (idx[None, :] <= idx[:, None])[None]
      index = None
    else:
      if cache.batch_size != b:
        raise ValueError(f"CausalLM.forward: cache batch {cache.batch_size} != input batch {b}")
      cache.check_room(s)
      index = cache.index
      valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, index))
      slots = jnp.arange(cache.max_len)
      q_slots = index + jnp.arange(s)
      attn_mask = valid[:, None, :] & (slots[None, None, :] <= q_slots[None, :, None])

    if keep_last is not None and not 0 <= keep_last <= s:
      raise ValueError(f"CausalLM.forward: keep_last={keep_last} must be in [0, seq={s}]")
    run = _run_layer_remat if cfg.remat else _run_layer
    new_keys, new_values = [], []
    n_layers = len(self.layers)
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      if keep_last is not None and i == n_layers - 1:
        x, new_kv = layer(x, cos, sin, attn_mask, kv, index, keep_last)
      else:
        x, new_kv = run(layer, x, cos, sin, attn_mask, kv, index)
      if new_kv is not None:
        new_keys.append(new_kv[0])
        new_values.append(new_kv[1])
    hidden = self.norm(x)
    logits = self.lm_logits(hidden) if compute_logits else None

    new_cache = None
    if cache is not None:
      last = jnp.max(jnp.where(mask, positions, -1), axis=1) + 1
      next_pos = jnp.where(mask.any(axis=1), jnp.maximum(last, cache.next_position), cache.next_position)
      new_cache = cache.replace(keys=tuple(new_keys), values=tuple(new_values), valid=valid,
                                next_position=next_pos.astype(jnp.int32), index=index + s)
    return LlmOutput(logits=logits, hidden_states=hidden, cache=new_cache)


def param_count(module: nnx.Module) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
