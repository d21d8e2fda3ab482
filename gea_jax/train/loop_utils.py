"""Training-loop guards shared by every trainer: SIGTERM -> checkpoint and clean exit, non-finite loss stop.

Usage in a loop::

  stop = install_sigterm_handler()
  for step in range(start, total):
    state, metrics = train_step(state, batch)
    check_finite(metrics, step + 1, checkpointer=ckpt)   # raises before anything is saved
    preempted = stop.stop_at(step + 1)                    # once per step, on every process
    ckpt.save(step + 1, params=..., force=preempted)
    if preempted:
      break                                               # the trainer reports it; the job exits with code 0
  stop.uninstall()

In a multi-process job the processes must stop at the same step, or the checkpoint (written collectively) and the
next collective hang: a scheduler's SIGTERM reaches the hosts at different times, each in another step. There
``install_sigterm_handler`` returns a ``SyncedPreemption``: JAX's preemption service (started by
``jax.distributed.initialize``) catches SIGTERM on any process, the processes agree on the step after the furthest
one's, and ``stop_at`` is true there on all of them.

A NaN or infinite loss raises ``NonFiniteLossError`` before the step's state can be saved, so the run's
last checkpoint is the last good one.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from pathlib import Path
from typing import Any, Mapping

import numpy as np

logger = logging.getLogger(__name__)


class PreemptionRequest:
  """Set by SIGTERM (and optionally other signals); the loop checks ``.requested`` at step boundaries.

  A second signal while a request is pending restores the previous handler and re-raises the signal,
  so a stuck run can still be killed.
  """

  def __init__(self, signals: tuple[int, ...]):
    self._event = threading.Event()
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self.signal_number: int | None = None

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def stop_at(self, step: int) -> bool:
    """Whether the loop should save and stop after ``step`` (one process: as soon as a signal came)."""
    del step
    return self.requested

  def request(self, signum: int | None = None):
    """Marks a stop as requested (used by the signal handler; callable by tests and schedulers)."""
    self.signal_number = signum
    self._event.set()

  def _handle(self, signum, frame):
    if self._event.is_set():
      logger.error("second %s: stopping immediately", signal.Signals(signum).name)
      self.uninstall()
      signal.raise_signal(signum)
      return
    logger.warning("%s received: saving a checkpoint and exiting at the next step boundary",
                   signal.Signals(signum).name)
    self.request(signum)

  def install(self) -> "PreemptionRequest":
    if threading.current_thread() is not threading.main_thread():
      raise RuntimeError("install_sigterm_handler() must be called from the main thread (Python signal rule)")
    for sig in self._signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def uninstall(self):
    for sig, prev in self._previous.items():
      signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    self._previous.clear()

  def __enter__(self) -> "PreemptionRequest":
    return self

  def __exit__(self, *exc):
    self.uninstall()


class SyncedPreemption:
  """A multi-process job's stop request: every process stops at the same step boundary.

  JAX's preemption service owns SIGTERM here (a Python handler would replace its C++ one): when any process gets the
  signal, the service collects every process's last boundary and picks the next one after the furthest,
  ``multihost_utils.reached_preemption_sync_point``. Boundaries are counted per process over its whole life (SFT's
  steps, then PPO's iterations, ...), not by the trainer's step number, so a signal that arrives between two stages
  (during an evaluation) stops the next stage at its first boundary. Every process must call ``stop_at`` once per
  boundary, in the same order; they do, since they run the same program.
  """

  _boundaries = 0  # per process, across every loop of its life

  def __init__(self):
    self._stopped = False

  @property
  def requested(self) -> bool:
    return self._stopped

  def stop_at(self, step: int) -> bool:
    """Whether every process stops after this boundary (``step`` is the trainer's, for the log only)."""
    from jax.experimental import multihost_utils
    SyncedPreemption._boundaries += 1
    if not self._stopped and multihost_utils.reached_preemption_sync_point(SyncedPreemption._boundaries):
      logger.warning("preemption: every process saves and stops after step %d", step)
      self._stopped = True
    return self._stopped

  def uninstall(self):
    pass

  def __enter__(self) -> "SyncedPreemption":
    return self

  def __exit__(self, *exc):
    pass


def _preemption_service_running() -> bool:
  """Whether this process belongs to a multi-process job whose JAX preemption service catches SIGTERM."""
  import jax
  from jax._src import distributed as jax_distributed
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return False
  if getattr(jax_distributed.global_state, "preemption_sync_manager", True) is None:  # private: absent = assume on
    logger.warning("multi-process job without JAX's preemption service (jax_enable_preemption_service=False): "
                   "SIGTERM is handled per process, so the processes may stop at different steps and hang")
    return False
  return True


def install_sigterm_handler(signals: tuple[int, ...] = (signal.SIGTERM,)) -> PreemptionRequest | SyncedPreemption:
  """Turns SIGTERM into a request to save a checkpoint and exit cleanly at a step boundary: the next one in a
  one-process run (``PreemptionRequest``), the same one on every process of a multi-process job
  (``SyncedPreemption``). Call the result's ``stop_at(step)`` once per step boundary."""
  if tuple(signals) == (signal.SIGTERM,) and _preemption_service_running():
    return SyncedPreemption()
  return PreemptionRequest(tuple(signals)).install()


class NonFiniteLossError(FloatingPointError):
  """A loss or metric became NaN/inf; the run stops and keeps its last good checkpoint."""

  def __init__(self, step: int, metric: str, value: float, last_good_step: int | None = None,
               checkpoint_dir: str | Path | None = None):
    self.step, self.metric, self.value, self.last_good_step = step, metric, value, last_good_step
    msg = f"non-finite {metric} at step {step}: {metric}={value}. The run stops here without saving"
    if last_good_step is not None:
      msg += f"; the last good checkpoint is step {last_good_step}"
      if checkpoint_dir is not None:
        msg += f" in {checkpoint_dir}"
    elif checkpoint_dir is not None:
      msg += f"; no checkpoint was saved yet in {checkpoint_dir}"
    super().__init__(msg + ".")


def _as_float(value: Any, name: str, step: int) -> float:
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"check_finite: {name} at step {step} must be a scalar, got shape {arr.shape}")
  return float(arr.reshape(()))


def check_finite(loss: Any, step: int, *, name: str = "loss", checkpointer: Any = None) -> None:
  """Raises ``NonFiniteLossError`` if ``loss`` (a scalar, or a dict of scalar metrics) is NaN or inf.

  Reading the value synchronizes with the device; call it where the loop reads its metrics anyway.
  ``checkpointer`` (a ``gea_jax.checkpoint.Checkpointer``) only serves to name the last good step.
  """
  items = loss.items() if isinstance(loss, Mapping) else [(name, loss)]
  for metric, value in items:
    v = _as_float(value, metric, step)
    if not math.isfinite(v):
      last, where = None, None
      if checkpointer is not None:
        checkpointer.wait()
        last, where = checkpointer.latest_step, checkpointer.directory
      raise NonFiniteLossError(int(step), metric, v, last, where)
