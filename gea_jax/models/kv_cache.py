"""Fixed-size key/value cache for incremental decoding (a jittable pytree).

Slots are filled left to right, the same number per row each call (``index``); per row the cache
tracks which slots hold real tokens (``valid``, so left- or right-padded prompts work) and the RoPE
position of the row's next real token (``next_position``). Keys / values are stored heads-major
([batch, kv_heads, max_len, head_dim]), the layout attention contracts them in, so a cached pass does not
transpose the whole cache of every layer (only its new tokens' keys / values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from gea_jax.sharding import constrain

CACHE_AXES = ("batch", "kv_heads", "length", "head_dim")


@struct.dataclass
class KVCache:
  keys: tuple[jax.Array, ...]  # per layer [batch, kv_heads, max_len, head_dim]
  values: tuple[jax.Array, ...]
  valid: jax.Array  # [batch, max_len] bool: slot holds a real (non-padding) token
  next_position: jax.Array  # [batch] int32: RoPE position of the next real token
  index: jax.Array  # [] int32: next slot to write (shared by all rows)

  @classmethod
  def create(cls, num_layers: int, batch: int, max_len: int, kv_heads: int, head_dim: int,
             dtype=jnp.float32) -> "KVCache":
    if batch <= 0 or max_len <= 0:
      raise ValueError(f"KVCache: batch and max_len must be positive, got batch={batch}, max_len={max_len}")
    shape = (batch, kv_heads, max_len, head_dim)
    zeros = lambda: constrain(jnp.zeros(shape, dtype), CACHE_AXES)
    return cls(keys=tuple(zeros() for _ in range(num_layers)), values=tuple(zeros() for _ in range(num_layers)),
               valid=jnp.zeros((batch, max_len), bool), next_position=jnp.zeros((batch,), jnp.int32),
               index=jnp.zeros((), jnp.int32))

  @property
  def batch_size(self) -> int:
    return self.valid.shape[0]

  @property
  def max_len(self) -> int:
    return self.valid.shape[1]

  @property
  def lengths(self) -> jax.Array:
    """Number of real tokens cached per row [batch]."""
    return self.valid.sum(axis=1).astype(jnp.int32)

  def check_room(self, seq_len: int) -> None:
    """Raise if writing ``seq_len`` more slots would overflow (only checkable outside jit)."""
    if isinstance(self.index, jax.core.Tracer):
      return
    if int(self.index) + seq_len > self.max_len:
      raise ValueError(f"KVCache overflow: {int(self.index)} slots used + {seq_len} new > max_len {self.max_len}")


def update_layer(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array):
  """Write k, v [batch, seq, kv_heads, head_dim] into the layer's slots [index, index + seq) (the cache is
  heads-major: [batch, kv_heads, max_len, head_dim])."""
  start = (0, 0, index, 0)
  cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype), start)
  cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), start)
  return constrain(cache_k, CACHE_AXES), constrain(cache_v, CACHE_AXES)
