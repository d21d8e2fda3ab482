"""Test set-up: 8 fake CPU devices (set before jax is imported) and small shared fixtures."""

import os

# Without the concurrency-optimized scheduler: with it, on a loaded machine (tests beside a training run), XLA:CPU
# deadlocked in the 8-device PPO tests (device 0 at an all-gather, the other 7 at an all-reduce of the same execution;
# 8 of 9 tries under load aborted, 3 of 3 passed without it; never seen idle). docs/benchmarks.md, session 20.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_cpu_enable_concurrency_optimized_scheduler=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Tests build fresh jitted closures of the same programs again and again (collectors, PPO updates, SFT steps over the
# same tiny shapes); XLA's persistent compilation cache makes every later compile (of >= 0.5 s) of an identical program
# a disk read. Shared by the pytest-xdist workers and kept between runs (a clean clone saves little: docs/benchmarks.md,
# test suite; local reruns save most). GEA_TEST_COMPILATION_CACHE="" turns it off.
_COMPILATION_CACHE = os.environ.get(
    "GEA_TEST_COMPILATION_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax_compilation_cache"))
if _COMPILATION_CACHE:
  jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

