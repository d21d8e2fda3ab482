"""Import / export of HF transformers causal LMs (Llama, Qwen2) to and from `gea_jax.models.llm.CausalLM`.

    model = load_causal_lm("path/to/hf_dir")          # config.json + (sharded) safetensors
    model = load_causal_lm("model.gguf")              # via gea_jax.interop.gguf.read_gguf
    save_causal_lm(model, "out_dir")                  # AutoModelForCausalLM.from_pretrained loads it

All paths go through `causal_lm_from_state_dict(hf_config, state_dict, dtype)`, which checks tensor
names and shapes strictly (`gea_jax.interop.llm_weights`). Export folds active LoRA adapters into the
written weights without touching the live module.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from gea_jax.interop import llm_weights
from gea_jax.models.llm import CausalLM
from gea_jax.models.llm_config import LlmConfig
from gea_jax.models.lora import merged_param_arrays

try:  # written by the tokenizer engineer; hf.py must import without it
  from gea_jax.interop.tokenizers import load_text_tokenizer  # noqa: F401
except ImportError:  # pragma: no cover - depends on the other module being present
  def load_text_tokenizer(path):
    raise ImportError("gea_jax.interop.tokenizers is not available; cannot load a text tokenizer from "
                      f"{os.fspath(path)!r}")

__all__ = ["causal_lm_from_state_dict", "load_causal_lm", "load_text_tokenizer", "read_safetensors",
           "save_causal_lm", "write_safetensors"]

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# --- safetensors (own reader/writer: numpy has no bfloat16, ml_dtypes does) ------------------------


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (bfloat16 via ml_dtypes)."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f"{path}: not a safetensors file (truncated header)")
    (n,) = struct.unpack("<Q", raw)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    dt = _ST_DTYPES.get(info.get("dtype"))
    if dt is None:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    start, end = info["data_offsets"]
    arr = np.frombuffer(data[start:end], dtype=dt)
    shape = tuple(info["shape"])
    if arr.size != int(np.prod(shape, dtype=np.int64)):
      raise ValueError(f"{path}: tensor {name!r} byte range does not match shape {shape}")
    out[name] = arr.reshape(shape)
  return out


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Write tensors (numpy, C order, little endian) as a .safetensors file."""
  header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  blobs = []
  for name in sorted(tensors):
    arr = np.ascontiguousarray(tensors[name])
    code = _ST_NAMES.get(arr.dtype)
    if code is None:
      raise ValueError(f"write_safetensors: tensor {name!r} has unsupported dtype {arr.dtype}")
    b = arr.tobytes()
    header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(b)]}
    offset += len(b)
    blobs.append(b)
  hbytes = json.dumps(header, separators=(",", ":")).encode()
  hbytes += b" " * (-len(hbytes) % 8)
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(hbytes)))
    f.write(hbytes)
    for b in blobs:
      f.write(b)
  os.replace(tmp, path)


def _read_json(path: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"file not found: {path}")
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: invalid JSON ({e})") from None


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Tensors of an HF directory: ``model.safetensors`` or the shards named by its index file."""
  path = os.fspath(path)
  single = os.path.join(path, SAFETENSORS)
  index = os.path.join(path, SAFETENSORS_INDEX)
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: missing 'weight_map'")
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      tensors = read_safetensors(os.path.join(path, shard))
      for name, arr in tensors.items():
        if weight_map.get(name) == shard:
          out[name] = arr
    missing = sorted(set(weight_map) - set(out))
    if missing:
      raise ValueError(f"{index}: tensor {missing[0]!r} is not in shard {weight_map[missing[0]]!r}")
    return out
  if os.path.isfile(single):
    return read_safetensors(single)
  raise FileNotFoundError(f"no weights in {path}: expected {single} or {index}")


# --- building / exporting the JAX model ------------------------------------------------------------


def causal_lm_from_state_dict(hf_config: Mapping[str, Any], state_dict: Mapping[str, np.ndarray],
                              dtype: Any = jnp.float32, *, compute_dtype: Any = None,
                              source: str = "checkpoint", **config_overrides) -> CausalLM:
  """A CausalLM from an HF config dict and a state dict with HF tensor names and layouts.

  ``dtype`` is the parameter dtype (and the compute dtype unless ``compute_dtype`` is given).
  Used by the safetensors and the GGUF loaders alike.
  """
  dtype_name = jnp.dtype(dtype).name
  cfg = LlmConfig.from_hf_dict(hf_config, source=f"{source} config", param_dtype=dtype_name,
                               dtype=jnp.dtype(compute_dtype or dtype).name, **config_overrides)
  flat = llm_weights.hf_to_jax(cfg, state_dict, source=source)
  abstract = nnx.eval_shape(lambda: CausalLM(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat_state = nnx.to_flat_state(state)
  paths = {tuple(p) for p, _ in flat_state}
  if paths != set(flat):  # the mapping and the module must agree; a bug here, not bad input
    raise AssertionError(f"llm_weights and CausalLM disagree: {sorted(map(str, paths ^ set(flat)))[:3]}")
  for p, var in flat_state:
    arr = flat[tuple(p)]
    var.set_value(jnp.asarray(np.asarray(arr, dtype=np.float32) if arr.dtype != np.float32 else arr,
                              dtype=dtype))
  return nnx.merge(graphdef, nnx.from_flat_state(flat_state))


def load_causal_lm(path: str | os.PathLike, dtype: Any = jnp.float32, *, compute_dtype: Any = None,
                   **config_overrides) -> CausalLM:
  """Load an HF directory (config.json + safetensors) or a ``.gguf`` file into a CausalLM."""
  path = os.fspath(path)
  if path.endswith(".gguf"):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"GGUF file not found: {path}")
    from gea_jax.interop.gguf import read_gguf
    hf_config, state_dict = read_gguf(path)
    return causal_lm_from_state_dict(hf_config, state_dict, dtype, compute_dtype=compute_dtype, source=path,
                                     **config_overrides)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"HF model directory not found: {path}")
  cfg_path = os.path.join(path, "config.json")
  hf_config = _read_json(cfg_path)
  LlmConfig.from_hf_dict(hf_config, source=cfg_path)  # fail on the config before reading weights
  state_dict = read_hf_state_dict(path)
  return causal_lm_from_state_dict(hf_config, state_dict, dtype, compute_dtype=compute_dtype, source=path,
                                   **config_overrides)


def causal_lm_state_dict(module: CausalLM) -> dict[str, np.ndarray]:
  """HF-named numpy tensors of ``module``, with active LoRA adapters merged in (module untouched)."""
  if not isinstance(module, CausalLM):
    raise TypeError(f"expected a CausalLM, got {type(module).__name__}")
  flat = {p: np.asarray(jax.device_get(a)) for p, a in merged_param_arrays(module).items()}
  return llm_weights.jax_to_hf(module.config, flat)


def save_causal_lm(module: CausalLM, path: str | os.PathLike) -> None:
  """Write ``path``/config.json + model.safetensors (LoRA merged) for transformers to load."""
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  tensors = causal_lm_state_dict(module)
  write_safetensors(os.path.join(path, SAFETENSORS), tensors, {"format": "pt"})
  hf_config = module.config.to_hf_dict()
  tmp = os.path.join(path, "config.json.tmp")
  with open(tmp, "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  os.replace(tmp, os.path.join(path, "config.json"))
