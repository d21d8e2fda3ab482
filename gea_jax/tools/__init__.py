"""gea_jax.tools."""
