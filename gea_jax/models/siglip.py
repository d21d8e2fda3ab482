"""SigLIP vision tower in Flax NNX, equal to transformers' ``SiglipVisionModel``.

Images are channels-last ``[batch, height, width, channels]`` float arrays, already normalised the way
SigLIP's processor does it (``(x - 0.5) / 0.5`` for pixels in [0, 1]). Module and parameter names map
one to one onto the HF checkpoint (``embeddings.patch_embedding``, ``encoder.layers.N.self_attn.q_proj``,
``post_layernorm``, ``head.attention.in_proj`` ...), so `gea_jax.interop.siglip` is a plain renaming.

`SiglipVisionModel.features(images)` returns the post-layernorm patch tokens as a ``[b, h, w, width]``
feature map: the common interface of the vision encoders that `gea_jax.models.vlm.VLM` consumes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gea_jax.sharding import constrain

ACTIVATIONS = {
  "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

# SigLIP's image processor: resize to image_size, rescale to [0, 1], normalise with mean 0.5 / std 0.5.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig:
  """The fields of HF's ``SiglipVisionConfig`` that define the network (defaults: siglip-base-patch16-224)."""

  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224  # square images, as transformers' SiglipVisionEmbeddings requires
  patch_size: int = 16
  hidden_act: str = "gelu_pytorch_tanh"
  layer_norm_eps: float = 1e-6
  vision_use_head: bool = True

  def __post_init__(self):
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"SiglipVisionConfig.{name}: expected a positive int, got {v!r}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"SiglipVisionConfig: num_attention_heads={self.num_attention_heads} does not divide "
                       f"hidden_size={self.hidden_size}")
    if self.patch_size > self.image_size:
      raise ValueError(f"SiglipVisionConfig: patch_size={self.patch_size} is larger than image_size={self.image_size}")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"SiglipVisionConfig.hidden_act: unsupported {self.hidden_act!r}; expected one of "
                       f"{sorted(ACTIVATIONS)}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"SiglipVisionConfig.layer_norm_eps: expected > 0, got {self.layer_norm_eps!r}")

  @property
  def image_hw(self) -> tuple[int, int]:
    return (self.image_size, self.image_size)

  @property
  def grid(self) -> tuple[int, int]:
    g = self.image_size // self.patch_size
    return (g, g)

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], source: str = "config") -> "SiglipVisionConfig":
    """Build from a ``SiglipVisionConfig`` dict (or a ``SiglipConfig`` dict: its ``vision_config``)."""
    if d.get("model_type") == "siglip" or "vision_config" in d:
      if not isinstance(d.get("vision_config"), Mapping):
        raise ValueError(f"{source}: a SiglipModel config needs a 'vision_config' object")
      d = d["vision_config"]
    model_type = d.get("model_type", "siglip_vision_model")
    if model_type != "siglip_vision_model":
      raise ValueError(f"{source}: model_type {model_type!r} is not a SigLIP vision model "
                       "(expected 'siglip_vision_model' or 'siglip')")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in d:
        kwargs[f.name] = d[f.name]
    try:
      return cls(**kwargs)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  def to_hf_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(model_type="siglip_vision_model", architectures=["SiglipVisionModel"])
    return d


class SiglipVisionOutput(NamedTuple):
  last_hidden_state: jax.Array  # [b, num_patches, width]
  pooler_output: jax.Array | None  # [b, width] (attention-pooling head) or None


def _linear(din: int, dout: int, axes: tuple[str | None, str | None], rngs: nnx.Rngs, dtype) -> nnx.Linear:
  return nnx.Linear(din, dout, use_bias=True, dtype=dtype, param_dtype=dtype,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs)


def _layer_norm(dim: int, eps: float, rngs: nnx.Rngs, dtype) -> nnx.LayerNorm:
  return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=dtype,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)), rngs=rngs)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
  """Bidirectional multi-head attention on [b, lq, d] / [b, lk, d]; softmax in float32."""
  b, lq, d = q.shape
  hd = d // num_heads
  q = q.reshape(b, lq, num_heads, hd)
  k = k.reshape(b, k.shape[1], num_heads, hd)
  v = v.reshape(b, v.shape[1], num_heads, hd)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (hd ** -0.5)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, lq, d)


class SiglipVisionEmbeddings(nnx.Module):
  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    p = config.patch_size
    self.patch_embedding = nnx.Conv(
      config.num_channels, config.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID",
      dtype=dtype, param_dtype=dtype,
      kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None, "conv_in", "embed")),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)), rngs=rngs)
    self.position_embedding = nnx.Embed(
      config.num_patches, config.hidden_size, dtype=dtype, param_dtype=dtype,
      embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("length", "embed")), rngs=rngs)

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    x = self.patch_embedding(pixel_values)  # [b, gh, gw, d]
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    return x + self.position_embedding.embedding[...][None].astype(x.dtype)


class SiglipAttention(nnx.Module):
  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    d = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.q_proj = _linear(d, d, ("embed", "heads"), rngs, dtype)
    self.k_proj = _linear(d, d, ("embed", "heads"), rngs, dtype)
    self.v_proj = _linear(d, d, ("embed", "heads"), rngs, dtype)
    self.out_proj = _linear(d, d, ("heads", "embed"), rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = _attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
    return self.out_proj(out)


class SiglipMLP(nnx.Module):
  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.act = ACTIVATIONS[config.hidden_act]
    self.fc1 = _linear(config.hidden_size, config.intermediate_size, ("embed", "mlp"), rngs, dtype)
    self.fc2 = _linear(config.intermediate_size, config.hidden_size, ("mlp", "embed"), rngs, dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = constrain(self.act(self.fc1(x)), ("batch", "length", "mlp"))
    return self.fc2(h)


class SiglipEncoderLayer(nnx.Module):
  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.layer_norm1 = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs, dtype)
    self.self_attn = SiglipAttention(config, rngs=rngs, dtype=dtype)
    self.layer_norm2 = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs, dtype)
    self.mlp = SiglipMLP(config, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    x = x + self.mlp(self.layer_norm2(x))
    return constrain(x, ("batch", "length", "embed"))


class SiglipEncoder(nnx.Module):
  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.layers = nnx.List([SiglipEncoderLayer(config, rngs=rngs, dtype=dtype)
                            for _ in range(config.num_hidden_layers)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = layer(x)
    return x


class MultiheadAttention(nnx.Module):
  """``torch.nn.MultiheadAttention`` (packed ``in_proj`` for q, k, v; then ``out_proj``)."""

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.num_heads = num_heads
    self.dim = dim
    self.in_proj = _linear(dim, 3 * dim, ("embed", "heads"), rngs, dtype)
    self.out_proj = _linear(dim, dim, ("heads", "embed"), rngs, dtype)

  def __call__(self, query: jax.Array, key_value: jax.Array) -> jax.Array:
    w, bias = self.in_proj.kernel[...], self.in_proj.bias[...]
    d = self.dim
    q = query @ w[:, :d].astype(query.dtype) + bias[:d].astype(query.dtype)
    k = key_value @ w[:, d:2 * d].astype(query.dtype) + bias[d:2 * d].astype(query.dtype)
    v = key_value @ w[:, 2 * d:].astype(query.dtype) + bias[2 * d:].astype(query.dtype)
    return self.out_proj(_attention(q, k, v, self.num_heads))


class SiglipMultiheadAttentionPoolingHead(nnx.Module):
  """A learned probe attends over the patch tokens, then a residual MLP: one pooled vector per image."""

  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.probe = nnx.Param(jax.random.normal(rngs.params(), (1, 1, config.hidden_size), dtype),
                           out_sharding=(None, None, "embed"))
    self.attention = MultiheadAttention(config.hidden_size, config.num_attention_heads, rngs=rngs, dtype=dtype)
    self.layernorm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs, dtype)
    self.mlp = SiglipMLP(config, rngs=rngs, dtype=dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    probe = jnp.broadcast_to(self.probe[...].astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
    h = self.attention(probe, x)
    h = h + self.mlp(self.layernorm(h))
    return h[:, 0]


class SiglipVisionModel(nnx.Module):
  """Patch embedding + position embedding -> pre-LN transformer encoder -> post-layernorm (-> pooling head)."""

  image_mean = IMAGE_MEAN
  image_std = IMAGE_STD

  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.config = config
    self.embeddings = SiglipVisionEmbeddings(config, rngs=rngs, dtype=dtype)
    self.encoder = SiglipEncoder(config, rngs=rngs, dtype=dtype)
    self.post_layernorm = _layer_norm(config.hidden_size, config.layer_norm_eps, rngs, dtype)
    if config.vision_use_head:
      self.head = SiglipMultiheadAttentionPoolingHead(config, rngs=rngs, dtype=dtype)
    else:
      self.head = None

  @property
  def feature_dim(self) -> int:
    return self.config.hidden_size

  @property
  def image_size(self) -> tuple[int, int]:
    """The input resolution the position embeddings were made for (images must have it)."""
    return self.config.image_hw

  def _check(self, pixel_values: jax.Array) -> None:
    c = self.config
    if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (*c.image_hw, c.num_channels):
      raise ValueError(f"SiglipVisionModel: expected images [batch, {c.image_hw[0]}, {c.image_hw[1]}, "
                       f"{c.num_channels}] (channels last), got shape {tuple(pixel_values.shape)}")

  def encode(self, pixel_values: jax.Array) -> jax.Array:
    """Post-layernorm patch tokens ``[b, num_patches, width]`` (HF's ``last_hidden_state``)."""
    self._check(pixel_values)
    x = constrain(self.embeddings(pixel_values), ("batch", "length", "embed"))
    return self.post_layernorm(self.encoder(x))

  def __call__(self, pixel_values: jax.Array) -> SiglipVisionOutput:
    x = self.encode(pixel_values)
    pooled = self.head(x) if self.head is not None else None
    return SiglipVisionOutput(last_hidden_state=x, pooler_output=pooled)

  def features(self, images: jax.Array) -> jax.Array:
    """The patch tokens as a feature map ``[b, grid_h, grid_w, width]`` (for image tokens in a VLM)."""
    x = self.encode(images)
    gh, gw = self.config.grid
    return x.reshape(x.shape[0], gh, gw, x.shape[-1])
