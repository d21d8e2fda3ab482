"""gea_jax.interop."""
