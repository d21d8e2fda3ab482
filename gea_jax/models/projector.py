"""LLaVA-style projector: vision features -> LLM embedding width (Linear -> GELU -> Linear).

As LLaVA-1.5's ``mlp2x_gelu``: ``fc1`` maps the vision width to the LLM width, exact (erf) GELU, ``fc2``
maps the LLM width to itself. Computes in ``dtype`` (the LLM's compute dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Projector(nnx.Module):
  """``[..., vision_dim] -> [..., llm_dim]``."""

  def __init__(self, vision_dim: int, llm_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
    for name, v in (("vision_dim", vision_dim), ("llm_dim", llm_dim)):
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"Projector.{name}: expected a positive int, got {v!r}")
    self.vision_dim, self.llm_dim = vision_dim, llm_dim

    def linear(din, dout, axes):
      return nnx.Linear(din, dout, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
                        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)), rngs=rngs)

    self.fc1 = linear(vision_dim, llm_dim, ("conv_out", "mlp"))
    self.fc2 = linear(llm_dim, llm_dim, ("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.vision_dim:
      raise ValueError(f"Projector: expected features [..., {self.vision_dim}], got shape {tuple(x.shape)}")
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
