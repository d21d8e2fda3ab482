"""gea_jax.envs: embodiments (JAX envs with pixels and language), their registry and renderer.

`make(name)` / `names()` come from `registry`; the `Embodiment` / `EnvState` interface from `base`.
"""

from gea_jax.envs.registry import make, names, register  # noqa: F401
