"""Rotary position embeddings in HF's "rotate half" layout, with the Llama/Qwen2 scaling variants.

`inv_frequencies` reproduces transformers' ``ROPE_INIT_FUNCTIONS`` for default, linear, dynamic (NTK),
llama3 and yarn; `apply_rope` rotates [batch, seq, heads, head_dim] by per-token positions.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from gea_jax.models.llm_config import LlmConfig


def _base_inv_freq(base, dim: int):
  return 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))


def _llama3(cfg: LlmConfig, inv: np.ndarray) -> np.ndarray:
  rs = cfg.rope_scaling
  low_wl = rs.original_max_position_embeddings / rs.low_freq_factor
  high_wl = rs.original_max_position_embeddings / rs.high_freq_factor
  wavelen = 2 * math.pi / inv
  scaled = np.where(wavelen > low_wl, inv / rs.factor, inv)
  smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
    rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  medium = (wavelen >= high_wl) & (wavelen <= low_wl)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def _yarn(cfg: LlmConfig, dim: int) -> tuple[np.ndarray, float]:
  rs = cfg.rope_scaling
  base = cfg.rope_theta
  omax = rs.original_max_position_embeddings
  factor = rs.factor if rs.factor is not None else cfg.max_position_embeddings / omax

  def mscale_of(scale, m=1.0):
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

  attn = rs.attention_factor
  if attn is None:
    if rs.mscale and rs.mscale_all_dim:
      attn = float(mscale_of(factor, rs.mscale) / mscale_of(factor, rs.mscale_all_dim))
    else:
      attn = mscale_of(factor)
  beta_fast = rs.beta_fast or 32
  beta_slow = rs.beta_slow or 1

  def corr_dim(rot):
    return (dim * math.log(omax / (rot * 2 * math.pi))) / (2 * math.log(base))

  low, high = corr_dim(beta_fast), corr_dim(beta_slow)
  if rs.truncate is None or rs.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
  extrap_weight = 1 - ramp
  pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  inv = (1.0 / (factor * pos_freqs)) * (1 - extrap_weight) + (1.0 / pos_freqs) * extrap_weight
  return inv.astype(np.float32), float(attn)


def inv_frequencies(cfg: LlmConfig, positions: jax.Array | None = None) -> tuple[jax.Array, float]:
  """Inverse frequencies [head_dim // 2] (float32) and the cos/sin scale, as transformers computes them.

  Dynamic NTK scaling depends on the longest position seen (``max(positions) + 1``), like HF's
  ``dynamic_rope_update`` for a fresh forward pass.
  """
  dim = cfg.head_dim
  rs = cfg.rope_scaling
  kind = "default" if rs is None else rs.rope_type
  if kind == "default":
    return jnp.asarray(_base_inv_freq(cfg.rope_theta, dim)), 1.0
  if kind == "linear":
    return jnp.asarray(_base_inv_freq(cfg.rope_theta, dim) / np.float32(rs.factor)), 1.0
  if kind == "llama3":
    return jnp.asarray(_llama3(cfg, _base_inv_freq(cfg.rope_theta, dim))), 1.0
  if kind == "yarn":
    inv, attn = _yarn(cfg, dim)
    return jnp.asarray(inv), attn
  if kind == "dynamic":
    maxp = cfg.max_position_embeddings
    seq_len = maxp if positions is None else jnp.maximum(jnp.max(positions) + 1, maxp)
    seq_len = jnp.asarray(seq_len, jnp.float32)
    base = cfg.rope_theta * ((rs.factor * seq_len / maxp) - (rs.factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)), 1.0
  raise ValueError(f"rope_scaling.rope_type: unsupported RoPE type {kind!r}")


def rope_cos_sin(cfg: LlmConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """cos, sin of shape [batch, seq, head_dim] for int positions [batch, seq]."""
  inv, scale = inv_frequencies(cfg, positions)
  freqs = positions.astype(jnp.float32)[..., None] * inv
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate x [batch, seq, heads, head_dim] (HF ``rotate_half`` convention)."""
  half = x.shape[-1] // 2
  rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rot * sin[:, :, None, :]
