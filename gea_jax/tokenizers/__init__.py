"""gea_jax.tokenizers."""
