"""Several fake XLA:CPU devices in one process (tests, benchmarks, local runs of mesh code): the XLA flags that make
them, set before JAX starts its CPU backend.

Besides the device count, XLA:CPU's concurrency-optimized scheduler is turned off: with it, on a loaded machine, the
8-device PPO programs deadlocked (device 0 waiting at an all-gather while the other 7 waited at an all-reduce of the
same execution, until XLA aborted the process; docs/benchmarks.md, session 20). Import this module before ``jax``.
"""

from __future__ import annotations

import os
import sys

NO_CONCURRENT_SCHEDULER = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def use_fake_cpu_devices(count: int) -> None:
  """Appends the flags for ``count`` CPU devices to ``XLA_FLAGS`` (and selects the CPU platform if none is set)."""
  if count < 1:
    raise ValueError(f"use_fake_cpu_devices: count must be >= 1, got {count}")
  backends = getattr(sys.modules.get("jax._src.xla_bridge"), "_backends", None)
  if backends:
    raise RuntimeError("use_fake_cpu_devices: JAX's backends are already initialized, so XLA_FLAGS is read already; "
                       "call it before the first use of jax")
  flags = os.environ.get("XLA_FLAGS", "")
  flags += f" --xla_force_host_platform_device_count={count} {NO_CONCURRENT_SCHEDULER}"
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
