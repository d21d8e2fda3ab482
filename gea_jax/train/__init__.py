"""gea_jax.train."""
