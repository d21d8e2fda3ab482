"""Checkpoints for every trainer (RVQ tokenizer, SFT, PPO): an orbax ``CheckpointManager`` wrapper.

Layout of a run's checkpoints (one orbax step directory per saved step, written atomically: orbax writes
``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, so a half-written step is never listed)::

  WORKDIR/checkpoints/<step>/
    params/      StandardSave: pytree of (possibly sharded) jax arrays, e.g. an ``nnx.State``
    opt_state/   StandardSave: optax state (absent when the trainer saved none)
    state/       JsonSave: {"step", "rng" (exact key data), "data_state" (grain get_state()), "extra"}
    meta/        JsonSave: {"format_version", "config" (ConfigDict as JSON), "versions", "saved_at"}
    assets/      directories copied in (e.g. ``assets/tokenizer`` = the RVQ artifact)
  WORKDIR/checkpoints_corrupt/<step>  a step that failed to restore while an older one restored fine
  WORKDIR/.checkpoint_assets/<name>   staged asset directories, copied into every following step

A step directory describes itself: ``load_step_meta(step_dir)`` returns its config, versions and asset
paths without the run that wrote it, which is what ``export`` and ``eval`` need.

Exact resume (a resumed run is bit-identical to an uninterrupted one with the same seed):

1. Save everything the next step depends on, at a step boundary: params, opt_state (optax state holds
   the step count used by schedules), the step number, the *base* RNG key, and the data iterator state
   (``grain`` ``DatasetIterator.get_state()``; restore with ``set_state``).
2. Never thread a mutated RNG key through the loop. Derive the key of step ``s`` as
   ``jax.random.fold_in(base_key, s)`` so it is a function of (seed, step) only.
3. Restore arrays with the same shardings (abstract targets from ``abstract_like(tree, mesh)`` or
   ``nnx.eval_shape``; put the restored key on the mesh like the fresh one) and re-run the same jitted
   step function: XLA then runs the identical program on identical inputs. Orbax stores arrays losslessly.
4. Resume from ``restored.step`` (the number of completed steps): the loop continues with step
   ``restored.step`` exactly as the uninterrupted run would have.

``tests/test_checkpoint.py`` checks this with a small optax loop (10 steps vs 5 + restore + 5, bitwise).

Corruption: ``restore_latest`` tries steps newest first. When a step fails to restore (truncated or
deleted array file, damaged metadata) it logs an error naming the step and path and tries the previous
one; if an older step restores with the same targets, the failed steps are moved to
``checkpoints_corrupt/`` (kept for inspection, never reused). If no step restores, it raises
``CheckpointError`` and moves nothing: the failure is then more likely a mismatch between the targets and
the checkpoint than corruption; its message then names the config keys that differ from the saved run's.
A run that restores under a config differing from the one the step was saved with (e.g. a loss term switched
on, more iterations) resumes, with a warning naming the keys: its optimizer state was built under the old
settings (e.g. Adam's moments are zero for parameters the saved run never moved).

Non-finite losses: trainers call ``gea_jax.train.loop_utils.check_finite`` before saving; as a safety net
``save`` refuses an ``extra`` whose "loss" (or "*/loss", "*_loss") is NaN/inf, so the last checkpoint on
disk is always the last good one.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import importlib.metadata
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from gea_jax import distributed

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ITEM_NAMES = ("params", "opt_state", "arrays", "state", "meta", "assets")
_ASSET_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BYTES_KEY = "__bytes_b64__"


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, found or restored; the message names the step and path."""


# ----------------------------------------------------------------------------------------------------
# Asset directories as an orbax item (copied inside the step's tmp dir, so they commit atomically).


class DirectoryAssetsHandler(ocp.AsyncCheckpointHandler):
  """Copies named directories into the item directory; restore returns {name: path}."""

  async def _copy(self, dirs: Mapping[str, str], directory: epath.Path):
    if jax.process_index() != 0:
      return
    Path(directory).mkdir(parents=True, exist_ok=True)
    for name, src in dirs.items():
      shutil.copytree(src, Path(directory) / name)

  async def async_save(self, directory: epath.Path, args: "DirectoryAssetsSave"):
    return [ocp.future.CommitFutureAwaitingContractedSignals(self._copy(dict(args.dirs), directory),
                                                            name="gea_assets_save")]

  def save(self, directory: epath.Path, args: "DirectoryAssetsSave"):
    if jax.process_index() != 0:
      return
    Path(directory).mkdir(parents=True, exist_ok=True)
    for name, src in dict(args.dirs).items():
      shutil.copytree(src, Path(directory) / name)

  def restore(self, directory: epath.Path, args: "DirectoryAssetsRestore | None" = None) -> dict[str, Path]:
    directory = Path(directory)
    if not directory.is_dir():
      return {}
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_dir()}

  def metadata(self, directory: epath.Path):
    return None


@ocp.args.register_with_handler(DirectoryAssetsHandler, for_save=True)
@dataclasses.dataclass
class DirectoryAssetsSave(ocp.args.CheckpointArgs):
  dirs: Mapping[str, str]


@ocp.args.register_with_handler(DirectoryAssetsHandler, for_restore=True)
@dataclasses.dataclass
class DirectoryAssetsRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------------------------------
# JSON encoding of the small host-side state (rng, data iterator state, metrics, config).


def _to_json(obj: Any, where: str) -> Any:
  """Converts numpy/jax scalars, small arrays and bytes to JSON values; errors name the offending key."""
  if obj is None or isinstance(obj, (bool, str)):
    return obj
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj)
  if isinstance(obj, (bytes, bytearray)):
    return {_BYTES_KEY: base64.b64encode(bytes(obj)).decode("ascii")}
  if isinstance(obj, (np.ndarray, jax.Array)):
    arr = np.asarray(obj)
    if arr.dtype.kind not in "biuf":
      raise TypeError(f"{where}: cannot store an array of dtype {arr.dtype} as JSON")
    return arr.tolist()
  if isinstance(obj, Mapping):
    out = {}
    for k, v in obj.items():
      if not isinstance(k, str):
        raise TypeError(f"{where}: keys must be strings, got {k!r} ({type(k).__name__})")
      out[k] = _to_json(v, f"{where}[{k!r}]")
    return out
  if isinstance(obj, (list, tuple)):
    return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(obj)]
  raise TypeError(f"{where}: cannot store a {type(obj).__name__} as JSON (expected dict/list/number/str/bytes)")


def _from_json(obj: Any) -> Any:
  if isinstance(obj, dict):
    if set(obj) == {_BYTES_KEY}:
      return base64.b64decode(obj[_BYTES_KEY])
    return {k: _from_json(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_from_json(v) for v in obj]
  return obj


def _encode_rng(rng: Any) -> dict | None:
  if rng is None:
    return None
  if not isinstance(rng, jax.Array):
    rng = jax.numpy.asarray(rng)
  typed = jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key)
  data = jax.random.key_data(rng) if typed else rng
  if not data.is_fully_addressable:
    data = data.addressable_data(0)  # keys are replicated: every process holds the same value
  data = np.asarray(data)
  return {"typed": bool(typed), "impl": str(jax.random.key_impl(rng)) if typed else None,
          "dtype": str(data.dtype), "shape": list(data.shape), "data": data.reshape(-1).tolist()}


def _decode_rng(blob: dict | None) -> jax.Array | None:
  if blob is None:
    return None
  data = np.asarray(blob["data"], dtype=blob["dtype"]).reshape(blob["shape"])
  if blob["typed"]:
    return jax.random.wrap_key_data(data, impl=blob["impl"])
  return jax.numpy.asarray(data)


def config_to_json(config: Any) -> dict | None:
  """A ConfigDict (``to_json_best_effort``), a dataclass or a plain dict as a JSON-compatible dict."""
  if config is None:
    return None
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  if isinstance(config, Mapping):
    return json.loads(json.dumps(_to_json(config, "config"), default=str))
  raise TypeError(f"config: expected an ml_collections ConfigDict, a dataclass or a dict, got {type(config).__name__}")


def versions() -> dict[str, str]:
  """Versions of the packages that define the checkpoint's meaning."""
  out = {"python": sys.version.split()[0]}
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "gea_jax"):
    try:
      out[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      if dist == "gea_jax":
        import gea_jax
        out[dist] = gea_jax.__version__
  return out


def abstract_like(tree: Any, mesh: jax.sharding.Mesh | None = None) -> Any:
  """ShapeDtypeStructs with the same shapes, dtypes and shardings: restore targets for ``restore_latest``.

  With ``mesh``, leaves not laid out on that mesh (e.g. an optax step count created on the default
  device) are restored replicated over it, so they can enter a jitted step with the sharded params.
  """
  def one(x):
    if isinstance(x, jax.Array):
      s = x.sharding
      if mesh is not None and not (isinstance(s, jax.sharding.NamedSharding) and s.mesh == mesh):
        s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    if isinstance(x, np.ndarray):
      return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x
  return jax.tree.map(one, tree)


# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RestoredState:
  """Everything a trainer needs to continue from a checkpoint."""

  step: int
  params: Any
  opt_state: Any | None
  rng: jax.Array | None
  data_state: Any | None
  extra: dict
  config: dict | None
  versions: dict
  path: Path  # the step directory
  assets: dict[str, Path]
  arrays: Any | None = None  # the ``arrays`` item (e.g. PPO's running episodes), when a target was given


def config_differences(saved: Mapping, current: Mapping, limit: int = 12) -> list[str]:
  """"KEY: saved X, now Y" for every leaf where two configs (as `config_to_json` stores them) differ, ``model``
  keys first, at most ``limit`` (then a count of the rest). Keys only one side has count as differences."""
  def flat(d, prefix=""):
    out = {}
    for k, v in d.items():
      if isinstance(v, Mapping):
        out.update(flat(v, f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = v
    return out
  a, b = flat(saved), flat(current)
  missing = object()
  keys = sorted((k for k in a.keys() | b.keys() if a.get(k, missing) != b.get(k, missing)),
                key=lambda k: (not k.startswith("model."), k))
  show = lambda v: "(absent)" if v is missing else repr(v)
  out = [f"{k}: saved {show(a.get(k, missing))}, now {show(b.get(k, missing))}" for k in keys[:limit]]
  if len(keys) > limit:
    out.append(f"... and {len(keys) - limit} more")
  return out


def load_step_meta(step_dir: str | Path) -> dict:
  """Config, versions, small state and asset paths of one step directory, read with nothing else.

  Returns {"step", "config", "versions", "format_version", "data_state", "extra", "assets": {name: Path}}.
  """
  step_dir = Path(step_dir)
  out = {}
  for item in ("meta", "state"):
    path = step_dir / item / "metadata"
    try:
      out[item] = _from_json(json.loads(path.read_text()))
    except FileNotFoundError as e:
      raise CheckpointError(f"{path}: missing (is {step_dir} a gea_jax checkpoint step directory?)") from e
    except json.JSONDecodeError as e:
      raise CheckpointError(f"{path}: damaged JSON ({e})") from e
  assets = DirectoryAssetsHandler().restore(epath.Path(step_dir / "assets"))
  meta, state = out["meta"], out["state"]
  return {"step": state.get("step"), "config": meta.get("config"), "versions": meta.get("versions", {}),
          "format_version": meta.get("format_version"), "data_state": state.get("data_state"),
          "extra": state.get("extra") or {}, "assets": assets}


def _check_against_target(restored: Any, target: Any, item: str, step_dir: Path):
  """Restored leaves must have the target's shapes and dtypes (orbax may otherwise return stored ones)."""
  leaves_r = jax.tree_util.tree_flatten_with_path(restored)[0]
  leaves_t = jax.tree_util.tree_flatten_with_path(target)[0]
  if len(leaves_r) != len(leaves_t):
    raise CheckpointError(f"{step_dir / item}: restored {len(leaves_r)} arrays but the target has {len(leaves_t)}")
  for (path, r), (_, t) in zip(leaves_r, leaves_t):
    if hasattr(t, "shape") and hasattr(r, "shape") and (tuple(r.shape) != tuple(t.shape) or r.dtype != t.dtype):
      raise CheckpointError(f"{step_dir / item}{jax.tree_util.keystr(path)}: checkpoint has {r.dtype}{list(r.shape)}, "
                            f"target expects {t.dtype}{list(t.shape)}")


# Orbax saves a replicated array "replica-parallel": each replica copies a 1/R slice of it to host, cut on device by an
# eager slice whose program compiles once per array shape and replica (~0.03 s each; a tiny model's 2 saves on 8
# devices compiled 184 of them, 6.5 s). Worth it for large arrays only: below this many bytes per slice one replica
# copies the whole array.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _replica_parallel_for_large_arrays_only() -> None:
  """Re-registers orbax's default jax.Array handler with ``MIN_REPLICA_SLICE_BYTES`` (a handler someone else
  registered, e.g. for Pathways, is left alone)."""
  default = ocp.type_handlers.get_type_handler(jax.Array)
  # orbax keeps the handler's settings in private attributes: an orbax without them keeps its default handler
  store = getattr(default, "_array_metadata_store", None)
  if type(default) is not ocp.type_handlers.ArrayHandler or store is None \
      or getattr(default, "_min_slice_bytes_for_replica_parallel", 0) is not None:
    return
  ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
      array_metadata_store=store, min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES), override=True)


class Checkpointer:
  """Saves and restores a trainer's state under ``WORKDIR/checkpoints`` (see the module docstring).

  Args:
    workdir: the run's directory.
    keep: number of most recent checkpoints kept (older ones are deleted).
    async_save: write arrays in a background thread after the device-to-host copy.
    save_every: ``save`` writes when ``step % save_every == 0`` (or ``force=True``).
    config: the run's config (ConfigDict/dataclass/dict), stored in every step as JSON.
    read_only: open an existing run for reading (eval/export): no saving, no cleanup, no quarantine.
  """

  def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True, save_every: int = 1000,
               config: Any = None, read_only: bool = False):
    if keep < 1:
      raise ValueError(f"Checkpointer: keep must be >= 1, got {keep}")
    if save_every < 1:
      raise ValueError(f"Checkpointer: save_every must be >= 1, got {save_every}")
    self.workdir = Path(workdir).absolute()
    self.directory = self.workdir / "checkpoints"
    self.corrupt_directory = self.workdir / "checkpoints_corrupt"
    self._staging = self.workdir / ".checkpoint_assets"
    self.keep, self.save_every, self.read_only, self.async_save = keep, save_every, read_only, async_save
    if read_only and not self.directory.is_dir():
      raise CheckpointError(f"{self.directory}: no checkpoint directory to read")
    self._config = config_to_json(config)
    self._last_restored_step: int | None = None
    _replica_parallel_for_large_arrays_only()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only, read_only=read_only, create=not read_only)
    handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                "arrays": ocp.StandardCheckpointHandler(), "state": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(), "assets": DirectoryAssetsHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEM_NAMES,
                                          item_handlers=handlers)

  # -- bookkeeping -------------------------------------------------------------------------------------

  def set_config(self, config: Any):
    """Replaces the config stored with the following checkpoints."""
    self._config = config_to_json(config)

  def all_steps(self, reload: bool = False) -> list[int]:
    """Complete steps, ascending (orbax's tmp directories are never listed); ``reload`` re-reads the disk."""
    if reload:
      self._manager.reload()
    return sorted(self._manager.all_steps())

  @property
  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def step_dir(self, step: int) -> Path:
    return self.directory / str(step)

  def wait(self):
    """Blocks until the in-flight asynchronous save (if any) is committed."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc):
    self.close()

  # -- assets ------------------------------------------------------------------------------------------

  def save_assets(self, name: str, src_dir: str | Path):
    """Stages a copy of ``src_dir``; it is written as ``<step>/assets/<name>`` into every following save.

    In a multi-host job process 0 copies it and every process waits for that (the checkpoint directory is on a file
    system all hosts share)."""
    if self.read_only:
      raise CheckpointError(f"{self.directory}: opened read_only, cannot stage asset {name!r}")
    if not _ASSET_NAME_RE.match(name):
      raise ValueError(f"save_assets: asset name {name!r} must match {_ASSET_NAME_RE.pattern}")
    src = Path(src_dir)
    if not src.is_dir():
      raise FileNotFoundError(f"save_assets({name!r}): {src} is not a directory")
    self.wait()  # an in-flight save may still be copying the staged version
    self._stage(name, src)

  def _stage(self, name: str, src: Path):
    """Copies ``src`` to the staged asset ``name`` (process 0; the others wait for it)."""
    if jax.process_index() == 0:
      dst = self._staging / name
      if dst.exists():
        shutil.rmtree(dst)
      dst.parent.mkdir(parents=True, exist_ok=True)
      shutil.copytree(src, dst)
    distributed.barrier(f"checkpoint asset {name} staged in {self._staging}")

  def staged_assets(self) -> dict[str, Path]:
    if not self._staging.is_dir():
      return {}
    return {p.name: p for p in sorted(self._staging.iterdir()) if p.is_dir()}

  def asset_path(self, name: str, step: int | None = None) -> Path:
    """Path of asset ``name`` inside a checkpoint: ``step``, else the restored step, else the latest."""
    self.wait()
    if step is None:
      step = self._last_restored_step if self._last_restored_step is not None else self.latest_step
    if step is None:
      raise FileNotFoundError(f"asset {name!r}: no checkpoint in {self.directory} yet")
    path = self.step_dir(step) / "assets" / name
    if not path.is_dir():
      have = sorted(DirectoryAssetsHandler().restore(epath.Path(self.step_dir(step) / "assets")))
      raise FileNotFoundError(f"asset {name!r}: {path} does not exist (step {step} has assets {have})")
    return path

  # -- save --------------------------------------------------------------------------------------------

  def should_save(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, *, params: Any, opt_state: Any = None, rng: Any = None, data_state: Any = None,
           extra: Mapping[str, Any] | None = None, arrays: Any = None, force: bool = False) -> bool:
    """Saves the state reached after ``step`` completed steps. Returns whether a checkpoint was written.

    ``arrays``: any other pytree of arrays the run needs to continue exactly (PPO: its running episodes).

    Writes when ``step % save_every == 0`` or ``force`` (e.g. on SIGTERM or at the end); a step that is
    already on disk is never overwritten. With ``async_save`` the call returns once arrays are copied to
    host memory; the files are committed in the background (``wait``/``close`` block until done).
    """
    if self.read_only:
      raise CheckpointError(f"{self.directory}: opened read_only, cannot save step {step}")
    step = int(step)
    if step < 0:
      raise ValueError(f"save: step must be >= 0, got {step}")
    if not force and not self.should_save(step):
      return False
    if step in self._manager.all_steps():
      logger.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
      return False
    for key, value in (extra or {}).items():  # a safety net behind check_finite: never save a diverged state
      if (key == "loss" or key.endswith(("/loss", "_loss"))) and np.size(value) == 1 \
          and not np.isfinite(float(np.asarray(value).reshape(()))):
        from gea_jax.train.loop_utils import NonFiniteLossError
        raise NonFiniteLossError(step, key, float(np.asarray(value).reshape(())), self.latest_step, self.directory)
    state = {"step": step, "rng": _encode_rng(rng), "data_state": _to_json(data_state, "data_state"),
             "extra": _to_json(dict(extra or {}), "extra")}
    meta = {"format_version": FORMAT_VERSION, "config": self._config, "versions": versions(),
            "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "has_opt_state": opt_state is not None}
    items = {"params": ocp.args.StandardSave(params), "state": ocp.args.JsonSave(state),
             "meta": ocp.args.JsonSave(meta),
             "assets": DirectoryAssetsSave({k: str(v) for k, v in self.staged_assets().items()})}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardSave(opt_state)
    if arrays is not None:
      items["arrays"] = ocp.args.StandardSave(arrays)
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
      raise CheckpointError(f"saving step {step} to {self.step_dir(step)} failed: {type(e).__name__}: {e}") from e
    if saved:
      logger.info("checkpoint step %d -> %s%s", step, self.step_dir(step),
                  " (async)" if self.async_save else "")
    return bool(saved)

  # -- restore -----------------------------------------------------------------------------------------

  def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any = None,
              abstract_arrays: Any = None) -> RestoredState:
    """Restores one step onto the targets' shardings; raises ``CheckpointError`` naming step and path.

    ``abstract_arrays``: the target of the ``arrays`` item (see `save`); ``RestoredState.arrays`` is None when the
    step was saved without one (e.g. by a run with other settings).

    ``abstract_params=None`` restores the stored tree as saved (nested dicts of arrays on the default
    device): enough for export and inspection, which know no model.
    """
    step_dir = self.step_dir(step)
    if not step_dir.is_dir():
      raise CheckpointError(f"checkpoint step {step}: {step_dir} does not exist (steps: {self.all_steps()})")
    try:
      small = load_step_meta(step_dir)
      if abstract_params is None:  # as saved, but on this process's default device (the saved ones may not exist)
        abstract_params = self._as_saved_on_default_device(step)
      args = {"params": ocp.args.StandardRestore(abstract_params)}
      if abstract_opt_state is not None:
        if not (step_dir / "opt_state").is_dir():
          raise CheckpointError(f"{step_dir / 'opt_state'}: missing, but an optimizer state target was given")
        args["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
      has_arrays = abstract_arrays is not None and (step_dir / "arrays").is_dir()
      if has_arrays:
        args["arrays"] = ocp.args.StandardRestore(abstract_arrays)
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
      params = restored["params"]
      _check_against_target(params, abstract_params, "params", step_dir)
      opt_state = None
      if abstract_opt_state is not None:
        opt_state = restored["opt_state"]
        _check_against_target(opt_state, abstract_opt_state, "opt_state", step_dir)
      arrays = None
      if has_arrays:
        arrays = restored["arrays"]
        _check_against_target(arrays, abstract_arrays, "arrays", step_dir)
      state = _from_json(json.loads((step_dir / "state" / "metadata").read_text()))
      rng = _decode_rng(state.get("rng"))
    except CheckpointError as e:
      raise CheckpointError(f"checkpoint step {step} at {step_dir}: {e}") from e
    except Exception as e:
      cause = (str(e).strip().splitlines() or [""])[0][:300]
      raise CheckpointError(f"checkpoint step {step} at {step_dir} is unreadable: {type(e).__name__}: {cause}") from e
    if small["step"] != step:
      raise CheckpointError(f"{step_dir / 'state' / 'metadata'}: records step {small['step']}, directory says {step}")
    self._last_restored_step = step
    if not self.read_only:  # keep carrying the checkpoint's assets into the following saves
      staged = self.staged_assets()
      for name, path in small["assets"].items():
        # several processes: all take the same branch (process 0 may already have staged it when another looks)
        if name not in staged or jax.process_count() > 1:
          self._stage(name, Path(path))
    return RestoredState(step=step, params=params, opt_state=opt_state, rng=rng, data_state=small["data_state"],
                         extra=small["extra"], config=small["config"], versions=small["versions"], path=step_dir,
                         assets=small["assets"], arrays=arrays)

  def _as_saved_on_default_device(self, step: int) -> Any:
    """The ``params`` item's stored tree as restore targets: its shapes and dtypes on the default device."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    metadata = self._manager.item_metadata(step)["params"]
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), metadata,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))

  def restore_latest(self, abstract_params: Any, abstract_opt_state: Any = None,
                     abstract_arrays: Any = None) -> RestoredState | None:
    """Restores the newest step that restores; None when there is no checkpoint at all.

    An unreadable step is logged (step, path, cause) and the previous one is tried. Steps that failed
    while an older one restored are moved to ``checkpoints_corrupt/`` so they are never picked again.
    """
    self.wait()
    steps = sorted(self.all_steps(reload=True), reverse=True)
    if not steps:
      return None
    failed: list[tuple[int, CheckpointError]] = []
    for step in steps:
      try:
        restored = self.restore(step, abstract_params, abstract_opt_state, abstract_arrays)
      except CheckpointError as e:
        logger.error("%s; falling back to an older checkpoint", e)
        failed.append((step, e))
        continue
      if failed:
        logger.error("resumed from checkpoint step %d after unreadable step(s) %s", step, [s for s, _ in failed])
        if not self.read_only:
          for bad, _ in failed:
            self._quarantine(bad)
      self._warn_changed_config(restored)
      return restored
    details = "; ".join(f"step {s}: {e}" for s, e in failed)
    hint = ""
    try:
      saved = load_step_meta(self.step_dir(steps[0])).get("config")
    except CheckpointError:
      saved = None
    diffs = config_differences(saved, self._config) if saved and self._config else []
    if diffs:
      hint = (f". The newest step was saved with a config that differs from this run's at: {'; '.join(diffs)}. A "
              "different model or layout changes the arrays: run with the saved values (e.g. --config.KEY=VALUE)")
    raise CheckpointError(f"no checkpoint in {self.directory} could be restored ({details}){hint}")

  def _warn_changed_config(self, restored: RestoredState):
    """A run resumed under other settings than it saved with continues, but its optimizer state was accumulated
    under the old ones (e.g. Adam's moments are zero for parameters the saved run never moved): say which."""
    if self.read_only or not (restored.config and self._config):
      return
    diffs = config_differences(restored.config, self._config)
    if diffs:
      logger.warning("%s: resuming step %d with a config that differs from the one it was saved with at: %s. The "
                     "optimizer state was accumulated under the saved settings", self.directory, restored.step,
                     "; ".join(diffs))

  def _quarantine(self, step: int):
    src = self.step_dir(step)
    if jax.process_index() == 0 and src.exists():
      self.corrupt_directory.mkdir(parents=True, exist_ok=True)
      dst = self.corrupt_directory / str(step)
      n = 1
      while dst.exists():
        dst, n = self.corrupt_directory / f"{step}.{n}", n + 1
      shutil.move(str(src), str(dst))
      logger.error("moved unreadable checkpoint step %d from %s to %s", step, src, dst)
    distributed.barrier(f"checkpoint {step} quarantined from {self.directory}")
    self._manager.reload()

