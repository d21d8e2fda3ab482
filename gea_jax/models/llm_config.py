"""Configuration of the decoder LLM (Llama / Qwen2 families), mirroring HF ``config.json``.

`LlmConfig.from_hf_dict` reads a transformers config dict (both the transformers 4 layout with
``rope_theta`` + ``rope_scaling`` and the transformers 5 layout with ``rope_parameters``);
`LlmConfig.to_hf_dict` writes one that ``transformers.AutoConfig`` loads. Anything the JAX model
cannot reproduce exactly (another architecture, activation, RoPE type, sliding windows) is a
``ValueError`` naming the offending field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _dtype_name(dtype: Any, field: str) -> str:
  if isinstance(dtype, str):
    name = dtype
  else:
    try:
      name = jnp.dtype(dtype).name
    except TypeError as e:
      raise ValueError(f"LlmConfig.{field}: not a dtype: {dtype!r}") from e
  if name not in DTYPES:
    raise ValueError(f"LlmConfig.{field}: unsupported dtype {name!r}; expected one of {sorted(DTYPES)}")
  return name


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling as HF's ``rope_parameters`` / ``rope_scaling`` describe it."""

  rope_type: str = "default"
  factor: float | None = None
  # llama3
  low_freq_factor: float | None = None
  high_freq_factor: float | None = None
  original_max_position_embeddings: int | None = None
  # yarn
  beta_fast: float | None = None
  beta_slow: float | None = None
  mscale: float | None = None
  mscale_all_dim: float | None = None
  attention_factor: float | None = None
  truncate: bool | None = None

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_scaling.rope_type: unsupported RoPE type {self.rope_type!r}; "
                       f"expected one of {list(ROPE_TYPES)}")
    needs = {"linear": ("factor",), "dynamic": ("factor",),
             "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
             "yarn": ("original_max_position_embeddings",)}.get(self.rope_type, ())
    for name in needs:
      if getattr(self, name) is None:
        raise ValueError(f"rope_scaling.{name} is required for rope_type {self.rope_type!r}")
    if self.rope_type == "llama3" and self.high_freq_factor == self.low_freq_factor:
      raise ValueError("rope_scaling: high_freq_factor must differ from low_freq_factor for rope_type 'llama3'")

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], max_position_embeddings: int) -> "RopeScaling":
    d = dict(d)
    rope_type = d.pop("rope_type", None) or d.pop("type", None) or "default"
    d.pop("type", None)
    d.pop("rope_theta", None)
    prf = d.pop("partial_rotary_factor", 1.0)
    if prf not in (None, 1.0, 1):
      raise ValueError(f"rope_scaling.partial_rotary_factor={prf!r} is not supported (only 1.0)")
    fields = {f.name for f in dataclasses.fields(cls)} - {"rope_type"}
    unknown = sorted(set(d) - fields)
    if unknown:
      raise ValueError(f"rope_scaling: unsupported key(s) {unknown} for rope_type {rope_type!r}")
    if rope_type in ("llama3", "yarn") and d.get("original_max_position_embeddings") is None:
      d["original_max_position_embeddings"] = max_position_embeddings
    return cls(rope_type=rope_type, **{k: v for k, v in d.items() if v is not None})

  def to_hf_dict(self) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": self.rope_type}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if f.name != "rope_type" and v is not None:
        out[f.name] = v
    return out


@dataclasses.dataclass(frozen=True)
class LlmConfig:
  """Hyper-parameters of a Llama / Qwen2 decoder; field names follow HF ``config.json``."""

  vocab_size: int = 256
  hidden_size: int = 64
  intermediate_size: int = 128
  num_hidden_layers: int = 2
  num_attention_heads: int = 4
  num_key_value_heads: int = 2
  head_dim: int | None = None  # None: hidden_size // num_attention_heads
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  attention_bias: bool = False  # q/k/v bias (and o_proj bias for Llama); always True for Qwen2
  mlp_bias: bool = False  # Llama only
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 2048
  architecture: str = "llama"
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  param_dtype: str = "float32"
  dtype: str = "float32"  # compute dtype
  remat: bool = False
  # Run q/k/v and gate/up as one matmul each (faster on CPU; turn off for tensor-parallel meshes).
  fuse_projections: bool = True

  def __post_init__(self):
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f"LlmConfig.architecture: unsupported architecture {self.architecture!r}; "
                       f"expected one of {sorted(ARCHITECTURES)}")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"LlmConfig.{name} must be a positive int, got {v!r}")
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"LlmConfig.num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                         f"({self.hidden_size}) when head_dim is not given")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.head_dim <= 0 or self.head_dim % 2:
      raise ValueError(f"LlmConfig.head_dim must be a positive even int (RoPE rotates pairs), got {self.head_dim}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"LlmConfig.num_key_value_heads ({self.num_key_value_heads}) must divide "
                       f"num_attention_heads ({self.num_attention_heads})")
    if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
      raise ValueError("LlmConfig.rms_norm_eps and LlmConfig.rope_theta must be positive")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling",
                         RopeScaling.from_hf_dict(self.rope_scaling, self.max_position_embeddings))
    if self.rope_scaling is not None and self.rope_scaling.rope_type == "default":
      object.__setattr__(self, "rope_scaling", None)
    if isinstance(self.eos_token_id, list):
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
    if self.architecture == "qwen2":
      if not self.attention_bias:
        raise ValueError("LlmConfig.attention_bias must be True for architecture 'qwen2' (Qwen2 has q/k/v bias)")
      if self.mlp_bias:
        raise ValueError("LlmConfig.mlp_bias is not supported for architecture 'qwen2'")
    object.__setattr__(self, "param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
    object.__setattr__(self, "dtype", _dtype_name(self.dtype, "dtype"))

  # --- derived -------------------------------------------------------------------------------------

  @property
  def o_proj_bias(self) -> bool:
    """Llama's ``attention_bias`` also adds a bias to o_proj; Qwen2 never has one."""
    return self.architecture == "llama" and self.attention_bias

  @property
  def jnp_param_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def jnp_dtype(self):
    return DTYPES[self.dtype]

  def replace(self, **kw) -> "LlmConfig":
    return dataclasses.replace(self, **kw)

  def num_params(self) -> int:
    d, f, h, kv, hd = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                       self.num_key_value_heads, self.head_dim)
    attn = d * h * hd * 2 + d * kv * hd * 2
    if self.attention_bias:
      attn += (h + 2 * kv) * hd + (d if self.o_proj_bias else 0)
    mlp = 3 * d * f + ((2 * f + d) if self.mlp_bias else 0)
    layer = attn + mlp + 2 * d
    emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
    return self.num_hidden_layers * layer + emb + d

  # --- HF config.json ------------------------------------------------------------------------------

  @classmethod
  def from_hf_dict(cls, d: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "LlmConfig":
    """Build from a transformers config dict; ``source`` names the file in error messages."""
    if not isinstance(d, Mapping):
      raise ValueError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    arch = None
    if model_type in ARCHITECTURES:
      arch = model_type
    else:
      for a in archs:
        for k, v in ARCHITECTURES.items():
          if a == v:
            arch = k
    if arch is None:
      raise ValueError(f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs!r}); "
                       f"supported: {sorted(ARCHITECTURES.values())}")
    for a in archs:
      if a not in ARCHITECTURES.values():
        raise ValueError(f"{source}: unsupported architecture {a!r} in 'architectures'; "
                         f"supported: {sorted(ARCHITECTURES.values())}")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    for k in required:
      if k not in d:
        raise ValueError(f"{source}: missing required key {k!r}")
    act = d.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
    if d.get("pretraining_tp", 1) not in (None, 1):
      raise ValueError(f"{source}: pretraining_tp={d['pretraining_tp']!r} is not supported (only 1)")
    if arch == "qwen2" and d.get("use_sliding_window", False):
      raise ValueError(f"{source}: use_sliding_window=true is not supported")
    max_pos = int(d.get("max_position_embeddings", 2048))
    rope = d.get("rope_parameters")
    if rope is None:
      rope = d.get("rope_scaling")
    rope = dict(rope or {})
    if any(isinstance(v, Mapping) for v in rope.values()):
      raise ValueError(f"{source}: per-layer-type rope_parameters are not supported")
    theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
    try:
      scaling = RopeScaling.from_hf_dict(rope, max_pos) if rope else None
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None
    nh = int(d["num_attention_heads"])
    kw = dict(
      vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
      intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
      num_attention_heads=nh, num_key_value_heads=int(d.get("num_key_value_heads") or nh),
      head_dim=d.get("head_dim"), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
      rope_scaling=scaling, attention_bias=True if arch == "qwen2" else bool(d.get("attention_bias", False)),
      mlp_bias=bool(d.get("mlp_bias", False)) if arch == "llama" else False,
      tie_word_embeddings=bool(d.get("tie_word_embeddings", False)), max_position_embeddings=max_pos,
      architecture=arch, bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
      pad_token_id=d.get("pad_token_id"))
    kw.update(overrides)
    try:
      return cls(**kw)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  def to_hf_dict(self) -> dict[str, Any]:
    """A transformers config dict (transformers 5 layout) for ``LlamaForCausalLM`` / ``Qwen2ForCausalLM``."""
    rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling is not None:
      rope.update(self.rope_scaling.to_hf_dict())
    eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
    d: dict[str, Any] = {
      "architectures": [ARCHITECTURES[self.architecture]], "model_type": self.architecture,
      "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
      "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
      "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
      "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
      "max_position_embeddings": self.max_position_embeddings, "rope_parameters": rope,
      "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
      "eos_token_id": eos, "pad_token_id": self.pad_token_id, "dtype": self.param_dtype,
    }
    if self.architecture == "llama":
      d["attention_bias"] = self.attention_bias
      d["mlp_bias"] = self.mlp_bias
    else:
      d["use_sliding_window"] = False
    return d

