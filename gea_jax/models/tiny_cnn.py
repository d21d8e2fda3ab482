"""A tiny CNN vision encoder for fast CPU runs, behind the same interface as SigLIP / EfficientNet.

``features(images) -> [b, H / 2**n, W / 2**n, channels[-1]]``: n stride-2 3x3 convolutions (SAME padding)
with GELU, then a LayerNorm over channels. ``image_mean`` / ``image_std`` map pixels in [0, 1] to [-1, 1].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gea_jax.sharding import constrain


class TinyCNN(nnx.Module):
  image_mean = (0.5, 0.5, 0.5)
  image_std = (0.5, 0.5, 0.5)

  def __init__(self, channels: tuple[int, ...] = (16, 32, 64), *, rngs: nnx.Rngs, in_channels: int = 3,
               dtype=jnp.float32):
    channels = tuple(channels)
    if not channels or any(not isinstance(c, int) or c <= 0 for c in channels):
      raise ValueError(f"TinyCNN.channels: expected a non-empty tuple of positive ints, got {channels!r}")
    self.in_channels = in_channels
    self.convs = nnx.List()
    cin = in_channels
    for cout in channels:
      self.convs.append(nnx.Conv(
        cin, cout, kernel_size=(3, 3), strides=(2, 2), padding="SAME", dtype=dtype, param_dtype=dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.he_normal(), (None, None, "conv_in", "conv_out")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)), rngs=rngs))
      cin = cout
    self.norm = nnx.LayerNorm(cin, dtype=dtype, param_dtype=dtype,
                              scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)
    self.feature_dim = cin

  def features(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f"TinyCNN: expected images [batch, height, width, {self.in_channels}] (channels last), "
                       f"got shape {tuple(images.shape)}")
    x = images
    for conv in self.convs:
      x = constrain(jax.nn.gelu(conv(x)), ("batch", None, None, "conv_out"))
    return self.norm(x)
