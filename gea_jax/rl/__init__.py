"""gea_jax.rl."""
