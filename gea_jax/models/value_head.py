"""Value head for the RL stage: an MLP from the LLM's last hidden state to a scalar value.

Runs in float32 whatever the LLM's dtype (values and returns are compared in float32 by PPO). The last
layer starts small (std 0.01), so a fresh head predicts values near 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class ValueHead(nnx.Module):
  """``[..., embed] -> [...]``: Linear -> tanh-GELU -> Linear(1)."""

  def __init__(self, embed_dim: int, hidden_dim: int = 256, *, rngs: nnx.Rngs):
    for name, v in (("embed_dim", embed_dim), ("hidden_dim", hidden_dim)):
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"ValueHead.{name}: expected a positive int, got {v!r}")
    self.embed_dim = embed_dim
    self.fc1 = nnx.Linear(embed_dim, hidden_dim, dtype=jnp.float32, param_dtype=jnp.float32,
                          kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)), rngs=rngs)
    self.fc2 = nnx.Linear(hidden_dim, 1, dtype=jnp.float32, param_dtype=jnp.float32,
                          kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.01), ("mlp", None)),
                          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)), rngs=rngs)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    if hidden.shape[-1] != self.embed_dim:
      raise ValueError(f"ValueHead: expected hidden states [..., {self.embed_dim}], got shape {tuple(hidden.shape)}")
    h = jax.nn.gelu(self.fc1(hidden.astype(jnp.float32)), approximate=True)
    return self.fc2(h)[..., 0]
