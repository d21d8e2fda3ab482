"""Multi-host start-up: joins this process to the job's other processes before JAX is first used.

A multi-host job runs the same command on every host (one process per host); the processes then form one
global mesh over all their devices, each process feeds its own part of the batches and of PPO's environments,
and process 0 alone writes logs, reports and checkpoint metadata (every process writes its shards).

- Cloud TPU pod slices (and SLURM, Kubernetes, Open MPI): ``--distributed=auto``: JAX finds the coordinator,
  the number of processes and this process's id from the environment.
- Anywhere else (e.g. several processes on one CPU machine, how the tests run it): ``--coordinator_address=HOST:PORT
  --num_processes=N --process_id=I``. CPU processes exchange their collectives over gloo.
- Neither: one process (the default).

When one process of a job fails (an exception), ``run_or_stop_all`` tells the others through JAX's coordination
service and each one's ``watch_peers`` thread ends it at once, naming the failed process and its error. Left alone,
the failed process would wait at JAX's shutdown barrier and the others in their next collective until the barrier
timed out (5 minutes), and both would then abort without saying why. A process that dies without an exception
(killed, out of memory) is found by JAX's heartbeats (100 s).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback

MODES = ("none", "auto", "explicit")


class DistributedError(ValueError):
  """A bad multi-host flag; the message names the flag and what was expected."""


def mode_of(distributed: str, coordinator_address: str, num_processes: int | None, process_id: int | None) -> str:
  """Which start-up the flags ask for ("none", "auto" or "explicit"); raises ``DistributedError`` on a bad mix."""
  explicit = [name for name, v in (("--coordinator_address", coordinator_address), ("--num_processes", num_processes),
                                   ("--process_id", process_id)) if v not in (None, "")]
  if distributed not in ("", "none", "auto"):
    raise DistributedError(f"--distributed: must be 'auto' or 'none', got {distributed!r}")
  if distributed == "auto":
    if explicit:
      raise DistributedError(f"--distributed=auto finds the processes itself; drop {', '.join(explicit)}")
    return "auto"
  if not explicit:
    return "none"
  if len(explicit) != 3:
    missing = [n for n in ("--coordinator_address", "--num_processes", "--process_id") if n not in explicit]
    raise DistributedError(f"{', '.join(explicit)} given without {', '.join(missing)}: a multi-host start needs all three")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"--coordinator_address: expected HOST:PORT, got {coordinator_address!r}")
  if num_processes < 1:
    raise DistributedError(f"--num_processes: must be >= 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise DistributedError(f"--process_id: must be in [0, {num_processes}), got {process_id}")
  return "explicit"


def initialize(distributed: str = "", coordinator_address: str = "", num_processes: int | None = None,
               process_id: int | None = None, *, timeout_seconds: int = 300) -> bool:
  """Joins the job's processes (see the module docstring); returns whether a multi-host start was made.

  Must run before anything asks JAX for its devices.
  """
  mode = mode_of(distributed, coordinator_address, num_processes, process_id)
  if mode == "none":
    return False
  backends = getattr(sys.modules.get("jax._src.xla_bridge"), "_backends", None)
  if backends:
    raise DistributedError("--distributed / --coordinator_address: JAX's devices were already used in this process; "
                           "the multi-host start must come first")
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only read by the CPU backend
  kwargs = {} if mode == "auto" else dict(coordinator_address=coordinator_address, num_processes=int(num_processes),
                                          process_id=int(process_id))
  jax.distributed.initialize(initialization_timeout=int(timeout_seconds), **kwargs)
  return True


_BARRIER_USES: dict[str, int] = {}


def barrier(name: str, timeout_seconds: int = 6 * 3600) -> None:
  """Waits until every process of the job has reached ``name``; a no-op in a one-process run.

  A barrier of JAX's coordination service, not a device collective: the processes may arrive far apart (process 0
  building the datasets or writing the tokenizer while the others wait), which a collective does not survive (CPU
  processes' gloo transport gives up after 30 s). Every process must pass the same names in the same order.
  """
  import jax
  if jax.process_count() == 1:
    return
  uses = _BARRIER_USES[name] = _BARRIER_USES.get(name, 0) + 1
  from jax._src import distributed as jax_distributed
  client = jax_distributed.global_state.client
  if client is None:  # a runtime that formed the processes without JAX's client: fall back to a collective
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"{name} #{uses}")
    return
  client.wait_at_barrier(f"gea_jax: {name} #{uses}", int(timeout_seconds * 1000))


_GATHER_USES: dict[str, int] = {}


def allgather_bytes(name: str, payload: bytes, timeout_seconds: int = 6 * 3600) -> list[bytes]:
  """Every process's ``payload``, in process order (``[payload]`` in a one-process run), exchanged through JAX's
  coordination service, not a device collective: exact bytes (a collective would turn float64 into float32) and no
  deadline of the CPU transport while the processes arrive far apart. Every process must pass the same names in
  the same order."""
  import jax
  if jax.process_count() == 1:
    return [payload]
  client = _client()
  if client is None:
    raise RuntimeError("allgather_bytes: a multi-process job without JAX's distributed client "
                       "(start it with gea_jax.distributed.initialize)")
  uses = _GATHER_USES[name] = _GATHER_USES.get(name, 0) + 1
  prefix = f"gea_jax/gather/{name}/{uses}"
  client.key_value_set_bytes(f"{prefix}/{jax.process_index()}", payload)
  return [client.blocking_key_value_get_bytes(f"{prefix}/{i}", int(timeout_seconds * 1000))
          for i in range(jax.process_count())]


FAILURE_KEY = "gea_jax/failed_process"


def _client():
  from jax._src import distributed as jax_distributed
  return getattr(jax_distributed.global_state, "client", None)


def _exit_now(code: int) -> None:
  """Ends this process without Python's exit handlers (JAX's would wait at the shutdown barrier for the others)."""
  logging.shutdown()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(code)


_FAILED_HERE = threading.Event()  # this process reported the failure: its own watcher stays quiet
WATCH_POLL_MS = 2000


def watch_peers() -> bool:
  """Starts a thread that ends this process (exit code 1) as soon as another process of the job reports a failure
  (``run_or_stop_all``); returns whether it started (only in a multi-process job).

  It waits on the coordination service's key in slices of ``WATCH_POLL_MS`` and returns once the main thread has
  finished, before JAX's exit handler shuts the client down: a thread still blocked in the client then would be
  torn down inside C++ at interpreter exit, which aborts the process.
  """
  import jax
  client = _client()
  if client is None or jax.process_count() == 1:
    return False
  me = jax.process_index()

  def watch():
    while threading.main_thread().is_alive():
      try:
        failure = client.blocking_key_value_get(FAILURE_KEY, WATCH_POLL_MS)
      except Exception as e:  # pylint: disable=broad-except
        if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
          continue
        return  # the client shut down
      if not _FAILED_HERE.is_set():
        print(f"gea_jax: error: {failure}; stopping process {me} too", file=sys.stderr)
        _exit_now(1)
      return

  threading.Thread(target=watch, name="gea_jax-watch-peers").start()
  return True


def run_or_stop_all(fn, *args, **kwargs):
  """``fn(*args, **kwargs)``; if it raises in a multi-process job, prints the traceback, tells the other processes
  (their ``watch_peers`` threads stop them) and ends this process with exit code 1 (130 for Ctrl-C)."""
  import jax
  try:
    return fn(*args, **kwargs)
  except BaseException as e:  # pylint: disable=broad-except
    client = _client()
    if client is None or jax.process_count() == 1 or (isinstance(e, SystemExit) and e.code in (None, 0)):
      raise
    traceback.print_exc()
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
    message = f"process {jax.process_index()} failed: {type(e).__name__}" + (f": {first_line}" if first_line else "")
    _FAILED_HERE.set()
    try:
      client.key_value_set(FAILURE_KEY, message)
    except Exception:  # pylint: disable=broad-except  (another process reported first)
      pass
    print(f"gea_jax: error: {message}; the other processes are told to stop", file=sys.stderr)
    _exit_now(130 if isinstance(e, KeyboardInterrupt) else (e.code if isinstance(e, SystemExit) and
                                                              isinstance(e.code, int) else 1))
