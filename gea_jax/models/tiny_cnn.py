"""A tiny CNN vision encoder for fast CPU runs, behind the same interface as SigLIP / EfficientNet.

``features(images) -> [b, H / 2**n, W / 2**n, channels[-1]]``: n stride-2 3x3 convolutions (SAME padding)
with GELU, then a LayerNorm over channels. With ``coord_channels`` two constant channels holding each
pixel's (row, column) in [-1, 1] are appended to the input (CoordConv), so the features say *where* a thing
is, not only what it is: the VLM average-pools the feature map to a few tokens, and without them the
position of an object inside a pooled cell would be lost. ``image_mean`` / ``image_std`` map pixels in [0, 1] to [-1, 1].

With ``condition_dim`` > 0 the encoder is FiLM-conditioned (as RT-1's FiLM-EfficientNet is on the instruction):
``features(images, condition)`` takes a vector per image, and after each convolution the feature map becomes
``x * (1 + gamma) + beta`` with ``(gamma, beta)`` a linear function of the layer-normalised condition. The FiLM
layer starts at zero, so a fresh conditioned encoder computes exactly what the unconditioned one does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gea_jax.sharding import constrain


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _conv_im2col(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """SAME convolution as one matmul over the kh*kw strided shifts of the padded input (NHWC, HWIO)."""
  kh, kw, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  oh, ow = -(-h // stride), -(-w // stride)
  xp = jnp.pad(x, ((0, 0), _same_padding(h, kh, stride), _same_padding(w, kw, stride), (0, 0)))
  cols = [xp[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride, :]
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, -1).reshape(b * oh * ow, kh * kw * cin)
  return (patches @ kernel.reshape(kh * kw * cin, cout)).reshape(b, oh, ow, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_same(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """SAME convolution (NHWC input, HWIO kernel, no bias): XLA's convolution forward, an im2col matmul backward.

  XLA:CPU runs convolution *gradients* inside a loop (PPO's minibatch ``lax.scan``) ~17x slower than outside one
  (the encoder's three convolutions on 64 frames: 650 vs 37 ms; they took two thirds of a PPO update); the
  gradient of the same convolution written as a matmul over shifted slices runs in ~27 ms there (but ~15% slower
  than XLA's outside loops, hence `TinyCNN.loop_gradients`). The forward pass keeps XLA's convolution, which is
  fast in and out of loops (and 2x faster than the im2col form).
  """
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _conv_same_fwd(x, kernel, stride):
  return conv_same(x, kernel, stride), (x, kernel)


def _conv_same_bwd(stride, res, g):
  x, kernel = res
  return jax.vjp(lambda a, k: _conv_im2col(a, k, stride), x, kernel)[1](g)


conv_same.defvjp(_conv_same_fwd, _conv_same_bwd)


class TinyCNN(nnx.Module):
  image_mean = (0.5, 0.5, 0.5)
  image_std = (0.5, 0.5, 0.5)

  def __init__(self, channels: tuple[int, ...] = (16, 32, 64), *, rngs: nnx.Rngs, in_channels: int = 3,
               dtype=jnp.float32, coord_channels: bool = False, condition_dim: int = 0):
    channels = tuple(channels)
    if not channels or any(not isinstance(c, int) or c <= 0 for c in channels):
      raise ValueError(f"TinyCNN.channels: expected a non-empty tuple of positive ints, got {channels!r}")
    self.in_channels = in_channels
    self.coord_channels = bool(coord_channels)
    self.convs = nnx.List()
    cin = in_channels + (2 if self.coord_channels else 0)
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
    self.channels = channels
    # True: convolution gradients as im2col matmuls (`conv_same`), for training steps inside a lax loop (PPO's
    # minibatch scan) on XLA:CPU; same values. Set by `use_loop_gradients`; not a parameter (not checkpointed).
    self.loop_gradients = False
    self.condition_dim = int(condition_dim)
    if self.condition_dim < 0:
      raise ValueError(f"TinyCNN.condition_dim: expected >= 0 (0 = no FiLM conditioning), got {condition_dim}")
    film_norm = film = None
    if self.condition_dim:
      film_norm = nnx.LayerNorm(self.condition_dim, dtype=dtype, param_dtype=dtype,
                                scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)
      film = nnx.Linear(self.condition_dim, 2 * sum(channels), dtype=dtype, param_dtype=dtype,
                        kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed", None)),
                        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)), rngs=rngs)
    self.film_norm = nnx.data(film_norm)
    self.film = nnx.data(film)

  def features(self, images: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    """``[b, H, W, in_channels]`` (+ ``condition [b, condition_dim]`` when FiLM-conditioned) -> feature map."""
    if images.ndim != 4 or images.shape[-1] != self.in_channels:
      raise ValueError(f"TinyCNN: expected images [batch, height, width, {self.in_channels}] (channels last), "
                       f"got shape {tuple(images.shape)}")
    film = None
    if self.film is not None:
      if condition is None or condition.shape != (images.shape[0], self.condition_dim):
        raise ValueError(f"TinyCNN: this encoder is FiLM-conditioned: expected a condition "
                         f"[{images.shape[0]}, {self.condition_dim}], got "
                         f"{None if condition is None else tuple(condition.shape)}")
      film = self.film(self.film_norm(condition.astype(images.dtype)))
      offsets = np.cumsum((0,) + tuple(2 * c for c in self.channels))
    elif condition is not None:
      raise ValueError("TinyCNN: a condition was given but this encoder has no FiLM layer (condition_dim=0)")
    x = images
    if self.coord_channels:
      b, h, w, _ = images.shape
      rows = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, h, dtype=images.dtype)[:, None, None], (h, w, 1))
      cols = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, w, dtype=images.dtype)[None, :, None], (h, w, 1))
      x = jnp.concatenate([x, jnp.broadcast_to(jnp.concatenate([rows, cols], -1), (b, h, w, 2))], -1)
    for i, conv in enumerate(self.convs):
      if self.loop_gradients:
        dt = conv.dtype or x.dtype
        x = conv_same(x.astype(dt), conv.kernel[...].astype(dt), conv.strides[0]) + conv.bias[...].astype(dt)
      else:
        x = conv(x)
      if film is not None:
        gamma, beta = jnp.split(film[:, offsets[i]:offsets[i + 1]], 2, axis=-1)
        x = x * (1.0 + gamma[:, None, None]) + beta[:, None, None]
      x = constrain(jax.nn.gelu(x), ("batch", None, None, "conv_out"))
    return self.norm(x)


def use_loop_gradients(module: nnx.Module, on: bool = True) -> nnx.Module:
  """Set `TinyCNN.loop_gradients` on every TinyCNN inside ``module`` (in place): for a trainer whose update runs
  its gradient steps inside a lax loop (gea_jax.train.ppo). Outputs and gradients are the same either way."""
  for _, node in nnx.iter_graph(module):
    if isinstance(node, TinyCNN):
      node.loop_gradients = bool(on)
  return module
