"""LoRA adapters on the LLM's attention and MLP projections, with merge/unmerge and trainable filters.

`apply_lora` attaches a `LoraAdapter` to every targeted `gea_jax.models.llm.Proj` (y += scale * x A B,
A random, B zero, scale = alpha / rank). Adapter weights are `LoraParam`, a distinct variable type,
so ``nnx.state(model, LoraParam)`` is exactly the adapters and ``trainable_filter("lora")`` lets
``nnx.grad`` / ``nnx.Optimizer(model, tx, wrt=...)`` keep gradients and optimizer state for them only.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gea_jax.models.llm import Proj

ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS
TRAIN_MODES = ("lora", "full", "frozen")


class LoraParam(nnx.Param):
  """A LoRA adapter weight (a Param subclass: "full" training includes it, "lora" selects only it)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 8
  alpha: float = 16.0
  target_modules: tuple[str, ...] = ALL_TARGETS

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
      raise ValueError(f"LoraConfig.rank must be a positive int, got {self.rank!r}")
    if not self.alpha > 0:
      raise ValueError(f"LoraConfig.alpha must be positive, got {self.alpha!r}")
    targets = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
    if not targets:
      raise ValueError("LoraConfig.target_modules must not be empty")
    bad = [t for t in targets if t not in ALL_TARGETS]
    if bad:
      raise ValueError(f"LoraConfig.target_modules: unknown module {bad[0]!r}; expected names from {ALL_TARGETS}")
    object.__setattr__(self, "target_modules", targets)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class LoraAdapter(nnx.Module):
  """Low-rank update for a Proj: A [*in_shape, rank], B [rank, *out_shape]."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_axes: Sequence[str | None],
               out_axes: Sequence[str | None], *, rank: int, alpha: float, dtype: str, param_dtype: str,
               rngs: nnx.Rngs):
    self.rank = rank
    self.scale = float(alpha) / rank
    self.dtype = dtype
    self.merged = False
    fan_in = math.prod(in_shape)
    bound = 1.0 / math.sqrt(fan_in)  # PEFT's kaiming_uniform(a=sqrt(5)) bound
    a = jax.random.uniform(rngs.params(), tuple(in_shape) + (rank,), jnp.dtype(param_dtype), -bound, bound)
    self.lora_a = LoraParam(a, out_sharding=tuple(in_axes) + ("lora_rank",))
    self.lora_b = LoraParam(jnp.zeros((rank,) + tuple(out_shape), jnp.dtype(param_dtype)),
                            out_sharding=("lora_rank",) + tuple(out_axes))

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = jnp.dtype(self.dtype)
    a, b = self.lora_a[...], self.lora_b[...]
    n_in = a.ndim - 1
    lead, k_in = x.shape[:x.ndim - n_in], math.prod(a.shape[:-1])
    # as 2-D matmuls: XLA-CPU handles the rank-r products far better than as N-D tensordots
    h = jnp.dot(x.astype(dt).reshape(-1, k_in), a.astype(dt).reshape(k_in, self.rank))
    y = jnp.dot(h, (b * self.scale).astype(dt).reshape(self.rank, -1))
    return y.reshape(lead + b.shape[1:])

  def delta(self) -> jax.Array:
    """scale * A B, shaped like the base kernel (float32)."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return self.scale * jnp.tensordot(a, b, axes=1)


def _targets(model: nnx.Module, names: Sequence[str]):
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, Proj) and path and path[-1] in names]


def lora_projections(model: nnx.Module):
  """(path, Proj) for every projection that carries an adapter."""
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, Proj) and node.lora is not None]


def apply_lora(model: nnx.Module, lora_cfg: LoraConfig, rngs: nnx.Rngs) -> nnx.Module:
  """Attach adapters (in place) to every projection named in ``lora_cfg.target_modules``."""
  if not isinstance(lora_cfg, LoraConfig):
    raise TypeError(f"apply_lora: expected a LoraConfig, got {type(lora_cfg).__name__}")
  found = _targets(model, lora_cfg.target_modules)
  if not found:
    raise ValueError(f"apply_lora: no projection named {lora_cfg.target_modules} in {type(model).__name__}")
  for path, proj in found:
    if proj.lora is not None:
      raise ValueError(f"apply_lora: {'.'.join(map(str, path))} already has a LoRA adapter")
    proj.lora = LoraAdapter(proj.in_shape, proj.out_shape, proj.in_axes, proj.out_axes, rank=lora_cfg.rank,
                            alpha=lora_cfg.alpha, dtype=proj.dtype, param_dtype=proj.kernel.dtype.name,
                            rngs=rngs)
  return model


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Fold every adapter into its base kernel (in place); the adapters stay, inactive, for unmerge."""
  for _, proj in lora_projections(model):
    if not proj.lora.merged:
      k = proj.kernel[...]
      proj.kernel[...] = (k.astype(jnp.float32) + proj.lora.delta()).astype(k.dtype)
      proj.lora.merged = True
  return model


def merged_copy(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` with its active adapters folded into the copy's kernels; ``model`` is untouched.

  For inference with fixed parameters (one rollout call, one evaluation): each adapted projection is then one
  matmul instead of three (the rank-r products are small, latency-bound ops; they cost ~25-30% of a one-token
  decoding step). The copy holds a second set of the adapted kernels; it is jit-safe (inside a trace the folding
  is part of the computation). A model without active adapters is returned as is.
  """
  if all(proj.lora.merged for _, proj in lora_projections(model)):
    return model
  return merge_lora(nnx.clone(model))


def unmerge_lora(model: nnx.Module) -> nnx.Module:
  """Undo `merge_lora` (in place): subtract the adapters from the kernels and reactivate them."""
  for _, proj in lora_projections(model):
    if proj.lora.merged:
      k = proj.kernel[...]
      proj.kernel[...] = (k.astype(jnp.float32) - proj.lora.delta()).astype(k.dtype)
      proj.lora.merged = False
  return model


def remove_lora(model: nnx.Module, *, merge: bool = True) -> nnx.Module:
  """Drop the adapters (in place), first merging them into the base weights if ``merge``."""
  if merge:
    merge_lora(model)
  for _, proj in lora_projections(model):
    proj.lora = None
  return model


base_params = nnx.All(nnx.Param, nnx.Not(LoraParam))


def trainable_filter(mode: str) -> Any:
  """An nnx filter of the trainable variables: "lora" (adapters only), "full" (all Params), "frozen"."""
  if mode == "lora":
    return LoraParam
  if mode == "full":
    return nnx.Param
  if mode == "frozen":
    return nnx.Nothing
  raise ValueError(f"trainable_filter: unknown mode {mode!r}; expected one of {TRAIN_MODES}")


def merged_param_arrays(model: nnx.Module) -> dict[tuple, np.ndarray]:
  """{path: numpy array} of the base parameters with active adapters folded in; the model is untouched."""
  flat = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, base_params))}
  for path, proj in lora_projections(model):
    if proj.lora.merged:
      continue
    key = tuple(path) + ("kernel",)
    base = flat[key]
    flat[key] = (base.astype(np.float32) + np.asarray(proj.lora.delta())).astype(base.dtype)
  return flat
