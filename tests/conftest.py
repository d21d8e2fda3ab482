"""Test set-up: 8 fake CPU devices (set before jax is imported) and small shared fixtures."""

import os

import pytest

from gea_jax.fake_devices import use_fake_cpu_devices  # before jax: it sets XLA_FLAGS

use_fake_cpu_devices(8)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The suite's time is mostly XLA:CPU compiling each test's programs (tiny shapes, run a few times), so tests compile
# with LLVM's cheap settings (jax_disable_most_optimizations: backend optimization level 0, no expensive LLVM passes;
# the HLO passes still run, so the programs are the same computations). GEA_TEST_XLA_OPTIMIZE=1 compiles as training
# does. Tests whose run time outweighs their compile time ask for the full pipeline with the `xla_optimized` fixture.
_CHEAP_COMPILE = os.environ.get("GEA_TEST_XLA_OPTIMIZE", "") not in ("1", "true")
jax.config.update("jax_disable_most_optimizations", _CHEAP_COMPILE)

# XLA's persistent compilation cache is opt-in (GEA_TEST_COMPILATION_CACHE=DIR): on this jaxlib (0.10.2) an 8-device
# XLA:CPU program read back from it can deadlock at its first collective (devices wait at different collectives of one
# run, e.g. device 0 at an all-gather and the rest at an all-reduce; XLA aborts the process after 40 s), while the same
# program compiled in-process runs: the mesh-vs-one-device PPO test's 8-device collector did so in every run from a
# warm cache, and never from a cold one (docs/benchmarks.md, session 23). The suite rarely hits its own entries from a
# clean clone (~20 s saved on tests/test_vlm_ppo.py), so by default every test compiles its programs.
_COMPILATION_CACHE = os.environ.get("GEA_TEST_COMPILATION_CACHE", "")
if _COMPILATION_CACHE:
  jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def xla_optimized():
  """Compile this test's programs with XLA's full optimization pipeline (for run-time-heavy tests)."""
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", _CHEAP_COMPILE)
