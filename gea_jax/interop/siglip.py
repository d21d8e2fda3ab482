"""Import an HF SigLIP vision tower (config.json + safetensors) into `gea_jax.models.siglip`.

`save_siglip_vision(model, path)` writes the directory back (transformers' ``SiglipVisionModel.from_pretrained``
loads it). `load_siglip_vision(path)` accepts the directory of a ``SiglipVisionModel`` or of a full ``SiglipModel``
(only its ``vision_model.*`` tensors are read; the text tower and ``logit_scale``/``logit_bias`` are
skipped). Key checking is strict: a missing or unexpected vision tensor, or a tensor of the wrong
shape, is a ``ValueError`` naming the tensor, the file and both shapes.

The strict assignment helpers (`read_safetensors`, `assign_strict`) are also used by the
EfficientNet importer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gea_jax.models.siglip import SiglipVisionConfig, SiglipVisionModel

PathT = tuple[Any, ...]
# module variable path -> (checkpoint key, converter from the checkpoint array to the JAX layout)
KeyMap = Callable[[PathT], tuple[str, Callable[[np.ndarray], np.ndarray]]]


def _identity(x: np.ndarray) -> np.ndarray:
  return x


def read_safetensors(directory: Path) -> tuple[dict[str, Any], dict[str, str]]:
  """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``.

  Returns (tensors, key -> file name) so that errors can name the file a tensor came from.
  """
  from safetensors import safe_open

  single = directory / "model.safetensors"
  index = directory / "model.safetensors.index.json"
  if single.is_file():
    files = [single]
  elif index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{index}: not a safetensors index (expected a JSON object with 'weight_map'): {e}") from e
    files = [directory / f for f in sorted(set(weight_map.values()))]
    for f in files:
      if not f.is_file():
        raise FileNotFoundError(f"{index} lists shard {f.name}, which does not exist in {directory}")
  else:
    raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
  tensors: dict[str, Any] = {}
  origin: dict[str, str] = {}
  for f in files:
    try:
      with safe_open(str(f), framework="flax") as handle:
        for k in handle.keys():
          tensors[k] = handle.get_tensor(k)
          origin[k] = f.name
    except Exception as e:  # safetensors raises its own error types for corrupt headers
      raise ValueError(f"{f}: cannot read safetensors file: {e}") from e
  return tensors, origin


def _short(names: Iterable[str], n: int = 8) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - n} more" if len(names) > n else ""
  return ", ".join(names[:n]) + more


def assign_strict(module: nnx.Module, tensors: Mapping[str, Any], key_map: KeyMap, source: str,
                  display: Callable[[str], str] = _identity) -> nnx.Module:
  """Fill every variable of ``module`` (concrete or from ``nnx.eval_shape``) from ``tensors``.

  Every module variable must find its tensor and every tensor must be used; shapes must agree after
  conversion. Values are cast to each variable's dtype. Returns a new module. ``display`` turns a key
  into the name the checkpoint file uses (for error messages).
  """
  graphdef, state = nnx.split(module)
  flat = nnx.to_flat_state(state)
  used: set[str] = set()
  missing: list[str] = []
  for path, var in flat:
    key, convert = key_map(path)
    if key not in tensors:
      missing.append(key)
      continue
    used.add(key)
    target = var.get_value()
    value = convert(tensors[key])
    if tuple(value.shape) != tuple(target.shape):
      raise ValueError(f"{source}: tensor {display(key)!r} has shape {tuple(np.shape(tensors[key]))}; expected "
                       f"{tuple(target.shape)} in the model's layout (after conversion: {tuple(value.shape)})")
    var.set_value(jnp.asarray(value, dtype=target.dtype))
  if missing:
    raise ValueError(f"{source}: missing tensor(s) {_short(map(display, missing))}")
  unexpected = set(tensors) - used
  if unexpected:
    raise ValueError(f"{source}: unexpected tensor(s) {_short(map(display, unexpected))} (not part of the model)")
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _linear_t(x):
  return x.T


def siglip_key(path: PathT) -> tuple[str, Callable]:
  """Module variable path -> (HF SiglipVisionModel key, converter)."""
  names = [str(p) for p in path]
  *prefix, leaf = names
  joined = ".".join(prefix)
  if joined == "embeddings.patch_embedding":
    return f"{joined}.{'weight' if leaf == 'kernel' else leaf}", (
      (lambda w: w.transpose(2, 3, 1, 0)) if leaf == "kernel" else _identity)
  if joined == "embeddings.position_embedding":
    return f"{joined}.weight", _identity
  if joined == "head.attention.in_proj":
    return ("head.attention.in_proj_weight", _linear_t) if leaf == "kernel" else ("head.attention.in_proj_bias",
                                                                                  _identity)
  if joined == "head" and leaf == "probe":
    return "head.probe", _identity
  if leaf == "kernel":
    return f"{joined}.weight", _linear_t
  if leaf == "scale":
    return f"{joined}.weight", _identity
  return ".".join(names), _identity


def _vision_tensors(tensors: Mapping[str, Any], full_model: bool) -> tuple[dict[str, Any], dict[str, str]]:
  """Drop the text tower of a SiglipModel and the ``vision_model.`` prefix; keep everything else.

  Returns (tensors by model key, model key -> key in the file)."""
  out, names = {}, {}
  for k, v in tensors.items():
    if full_model and (k.startswith("text_model.") or k in ("logit_scale", "logit_bias")):
      continue
    if k.endswith("embeddings.position_ids"):  # a non-persistent buffer some old exports contain
      continue
    name = k[len("vision_model."):] if k.startswith("vision_model.") else k
    out[name] = v
    names[name] = k
  return out, names


def load_siglip_vision(path: str | Path, dtype=jnp.float32) -> SiglipVisionModel:
  """Load an HF ``SiglipVisionModel`` / ``SiglipModel`` directory as a `SiglipVisionModel` (vision part)."""
  directory = Path(path)
  if not directory.is_dir():
    raise FileNotFoundError(f"load_siglip_vision: {directory} is not a directory (expected an HF checkpoint "
                            "directory with config.json and model.safetensors)")
  config_file = directory / "config.json"
  if not config_file.is_file():
    raise FileNotFoundError(f"load_siglip_vision: {config_file} does not exist")
  try:
    raw = json.loads(config_file.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{config_file}: invalid JSON: {e}") from e
  if not isinstance(raw, dict):
    raise ValueError(f"{config_file}: expected a JSON object")
  config = SiglipVisionConfig.from_hf_dict(raw, source=str(config_file))
  full_model = raw.get("model_type") == "siglip" or "vision_config" in raw
  tensors, origin = read_safetensors(directory)
  tensors, names = _vision_tensors(tensors, full_model)
  prefix = "vision_model." if full_model else ""
  display = lambda k: names.get(k, prefix + k)
  abstract = nnx.eval_shape(lambda: SiglipVisionModel(config, rngs=nnx.Rngs(0), dtype=dtype))
  files = sorted(set(origin.values()))
  source = str(directory / (files[0] if len(files) == 1 else "model.safetensors.index.json"))
  return assign_strict(abstract, tensors, siglip_key, source, display)


_INVERSE = {"patch": lambda w: w.transpose(3, 2, 0, 1), "linear": lambda w: w.T, "none": lambda x: x}


def _export_kind(path: PathT) -> str:
  names = [str(p) for p in path]
  if names[-1] != "kernel":
    return "none"
  return "patch" if names[:2] == ["embeddings", "patch_embedding"] else "linear"


def save_siglip_vision(model: SiglipVisionModel, path: str | Path) -> Path:
  """Write ``model`` as an HF ``SiglipVisionModel`` directory (config.json + model.safetensors)."""
  import jax
  from safetensors.flax import save_file

  directory = Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for var_path, var in nnx.to_flat_state(nnx.state(model)):
    key, _ = siglip_key(var_path)
    value = jax.device_get(var.get_value())
    tensors[key] = jnp.asarray(np.ascontiguousarray(_INVERSE[_export_kind(var_path)](np.asarray(value))))
  dtypes = {str(v.dtype) for v in tensors.values()}
  config = model.config.to_hf_dict()
  config["dtype"] = dtypes.pop() if len(dtypes) == 1 else "float32"
  (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
  return directory
