"""gea_jax.envs."""
