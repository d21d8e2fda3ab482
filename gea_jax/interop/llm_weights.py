"""One-to-one mapping between HF Llama/Qwen2 tensor names and `CausalLM` parameter paths.

HF stores a linear layer as ``weight`` [out, in]; `gea_jax.models.llm.Proj` stores ``kernel``
[*in_shape, *out_shape] (heads split out), so the mapping is a transpose plus reshape. Key checking
is strict: every expected tensor must be present with its exact shape and nothing else may be,
otherwise a ``ValueError`` names the tensor (and both shapes).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

import numpy as np

from gea_jax.models.llm_config import LlmConfig

Path = tuple  # e.g. ("layers", 0, "self_attn", "q_proj", "kernel")

# Buffers some older checkpoints carry; they are derived from the config, not parameters.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  path: Path  # parameter path inside CausalLM
  kind: str  # "kernel" | "bias" | "copy"
  in_shape: tuple[int, ...] = ()
  out_shape: tuple[int, ...] = ()
  copy_shape: tuple[int, ...] = ()

  @property
  def hf_shape(self) -> tuple[int, ...]:
    if self.kind == "kernel":
      return (math.prod(self.out_shape), math.prod(self.in_shape))
    if self.kind == "bias":
      return (math.prod(self.out_shape),)
    return self.copy_shape

  @property
  def jax_shape(self) -> tuple[int, ...]:
    if self.kind == "kernel":
      return self.in_shape + self.out_shape
    if self.kind == "bias":
      return self.out_shape
    return self.copy_shape

  def to_jax(self, w: np.ndarray) -> np.ndarray:
    if self.kind == "kernel":
      return np.ascontiguousarray(w.T).reshape(self.jax_shape)
    return w.reshape(self.jax_shape)

  def to_hf(self, w: np.ndarray) -> np.ndarray:
    if self.kind == "kernel":
      return np.ascontiguousarray(w.reshape(math.prod(self.in_shape), math.prod(self.out_shape)).T)
    return np.ascontiguousarray(w.reshape(self.hf_shape))


def tensor_specs(cfg: LlmConfig) -> dict[str, TensorSpec]:
  """HF tensor name -> how it maps onto the JAX parameter tree, for this config."""
  d, f, h, kv, hd, v = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
  specs: dict[str, TensorSpec] = {
    "model.embed_tokens.weight": TensorSpec(("embed_tokens", "embedding"), "copy", copy_shape=(v, d)),
    "model.norm.weight": TensorSpec(("norm", "scale"), "copy", copy_shape=(d,)),
  }
  if not cfg.tie_word_embeddings:
    specs["lm_head.weight"] = TensorSpec(("lm_head", "kernel"), "kernel", (d,), (v,))
  projs = {
    "self_attn.q_proj": ((d,), (h, hd), cfg.attention_bias),
    "self_attn.k_proj": ((d,), (kv, hd), cfg.attention_bias),
    "self_attn.v_proj": ((d,), (kv, hd), cfg.attention_bias),
    "self_attn.o_proj": ((h, hd), (d,), cfg.o_proj_bias),
    "mlp.gate_proj": ((d,), (f,), cfg.mlp_bias),
    "mlp.up_proj": ((d,), (f,), cfg.mlp_bias),
    "mlp.down_proj": ((f,), (d,), cfg.mlp_bias),
  }
  for i in range(cfg.num_hidden_layers):
    pre = f"model.layers.{i}."
    for norm in ("input_layernorm", "post_attention_layernorm"):
      specs[pre + norm + ".weight"] = TensorSpec(("layers", i, norm, "scale"), "copy", copy_shape=(d,))
    for name, (ins, outs, bias) in projs.items():
      mod = tuple(name.split("."))
      specs[pre + name + ".weight"] = TensorSpec(("layers", i) + mod + ("kernel",), "kernel", ins, outs)
      if bias:
        specs[pre + name + ".bias"] = TensorSpec(("layers", i) + mod + ("bias",), "bias", ins, outs)
  return specs


def hf_to_jax(cfg: LlmConfig, state_dict: Mapping[str, np.ndarray], *, source: str = "checkpoint"
              ) -> dict[Path, np.ndarray]:
  """HF state dict -> {parameter path: array in JAX layout}; strict about names and shapes."""
  specs = tensor_specs(cfg)
  names = set(state_dict)
  missing = sorted(set(specs) - names)
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise ValueError(f"{source}: missing tensor {missing[0]!r}{more}")
  extra = sorted(n for n in names - set(specs) if not _IGNORED.match(n))
  if cfg.tie_word_embeddings and "lm_head.weight" in extra:
    # Some tied checkpoints still store the head: accept it only if it really is the embedding.
    if np.array_equal(np.asarray(state_dict["lm_head.weight"]), np.asarray(state_dict["model.embed_tokens.weight"])):
      extra.remove("lm_head.weight")
    else:
      raise ValueError(f"{source}: tensor 'lm_head.weight' differs from 'model.embed_tokens.weight' but the "
                       "config has tie_word_embeddings=true")
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise ValueError(f"{source}: unexpected tensor {extra[0]!r}{more}")
  out: dict[Path, np.ndarray] = {}
  for name, spec in specs.items():
    w = state_dict[name]
    shape = tuple(w.shape)
    if shape != spec.hf_shape:
      raise ValueError(f"{source}: tensor {name!r} has shape {shape}, expected {spec.hf_shape}")
    out[spec.path] = spec.to_jax(np.asarray(w))
  return out


def jax_to_hf(cfg: LlmConfig, params: Mapping[Path, np.ndarray]) -> dict[str, np.ndarray]:
  """{parameter path: array} (JAX layout) -> HF state dict; strict about paths and shapes."""
  specs = tensor_specs(cfg)
  by_path = {s.path: (n, s) for n, s in specs.items()}
  missing = sorted(str(p) for p in set(by_path) - set(params))
  if missing:
    raise ValueError(f"CausalLM parameters: missing {missing[0]}")
  extra = sorted(str(p) for p in set(params) - set(by_path))
  if extra:
    raise ValueError(f"CausalLM parameters: no HF tensor for parameter {extra[0]}")
  out = {}
  for path, (name, spec) in by_path.items():
    w = np.asarray(params[path])
    if tuple(w.shape) != spec.jax_shape:
      raise ValueError(f"CausalLM parameter {path} has shape {tuple(w.shape)}, expected {spec.jax_shape}")
    out[name] = spec.to_hf(w)
  return out
