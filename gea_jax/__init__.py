"""gea_jax: a JAX/Flax NNX training stack for generalist embodied agents (GEA, LLaRP, LEO)."""

__version__ = "0.1.0"
