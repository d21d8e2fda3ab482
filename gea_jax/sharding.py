"""Device meshes and logical-axis sharding: one code path from 1 CPU device to a TPU pod.

Every parameter is created with logical axis names (``nnx.with_partitioning(init, ("embed", "mlp"))``);
a rules table (from the config) maps each logical name to a mesh axis of the ("data", "fsdp", "tensor")
mesh. A single device is simply a mesh of size 1.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated). First match wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("conv_in", None),
    ("conv_out", "fsdp"),
    ("lora_rank", None),
    ("codebook", None),
    ("norm", None),
    ("envs", ("data", "fsdp")),
)

# Variables are created unsharded; `create_sharded` / `shard_module` place them from their metadata.
nnx.use_eager_sharding(False)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fill a single -1 with the remaining devices; check the product equals ``num_devices``."""
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh.shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh.shape may contain at most one -1, got {shape}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape entries must be positive or -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape {shape}: {num_devices} devices are not divisible by {known}")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh.shape {shape} needs {math.prod(shape)} devices but {num_devices} are available")
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(shape, len(devices))
  try:
    arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # fake CPU devices / odd topologies: fall back to the given order
    arr = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(arr, MESH_AXES)


def rules_from_config(rules: Iterable[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Normalise a config rules table (list of [logical, mesh_axis|list|None]) into tuples."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f"sharding.rules[{i}] must be [logical_name, mesh_axis], got {rule!r}")
    name, target = rule
    targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    for t in targets:
      if t not in MESH_AXES:
        raise ValueError(f"sharding.rules[{i}] ({name!r}) maps to unknown mesh axis {t!r}; expected one of {MESH_AXES}")
    out.append((str(name), None if not targets else (targets[0] if len(targets) == 1 else targets)))
  return tuple(out)


def logical_to_spec(logical: Sequence[str | None] | None, rules=DEFAULT_RULES) -> PartitionSpec:
  """Map logical axis names to a PartitionSpec, never using one mesh axis twice."""
  if logical is None:
    return PartitionSpec()
  table = dict(reversed(rules))  # first match wins
  used: set[str] = set()
  out = []
  for name in logical:
    target = table.get(name) if name is not None else None
    targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    out.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
  return PartitionSpec(*out)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drop mesh axes that do not divide a dimension (e.g. 3 KV heads on 4 devices): replicate instead."""
  out = []
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for a in axes:
      if dim % (math.prod(mesh.shape[k] for k in kept) * mesh.shape[a]) == 0:
        kept.append(a)
    out.append(None if not kept else (kept[0] if len(kept) == 1 else tuple(kept)))
  return PartitionSpec(*out)


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  logical = var.get_metadata().get("out_sharding")
  spec = logical_to_spec(logical, rules)
  shape = getattr(var.get_value() if hasattr(var, "get_value") else var.value, "shape", ())
  return NamedSharding(mesh, _fit_spec(spec, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
  """A tree like ``state`` whose leaves are NamedShardings from each variable's logical axes."""
  return jax.tree.map(lambda v: variable_sharding(v, mesh, rules), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(factory: Callable[[], nnx.Module], mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Build ``factory()`` with every parameter created directly in its sharded layout.

  Also inside `use_mesh`: the layout comes from the variables' logical axes through ``rules``, so the factory runs
  without the global mesh (under it, flax would read the logical names as mesh axes and fail).
  """
  with _without_global_mesh():
    abstract = nnx.eval_shape(factory)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    out_shardings = jax.tree.map(lambda v: v.get_value() if isinstance(v, nnx.Variable) else v, shardings,
                                 is_leaf=lambda x: isinstance(x, nnx.Variable))
    state = jax.jit(lambda: nnx.state(factory()), out_shardings=out_shardings)()
  return nnx.merge(graphdef, state)


def _without_global_mesh():
  return jax.set_mesh(None) if hasattr(jax, "set_mesh") else contextlib.nullcontext()


def shard_module(module: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Place an existing module's variables (e.g. loaded from a checkpoint) on the mesh, in place."""
  state = nnx.state(module)
  shardings = state_shardings(state, mesh, rules)
  placed = jax.tree.map(lambda v, s: jax.device_put(v.get_value(), s), state, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
  nnx.update(module, placed)
  return module


def put(tree: Any, shardings: Any) -> Any:
  """``jax.device_put`` that also works in a multi-host job.

  ``shardings``: one sharding for every leaf, or a tree of them like ``tree``. A leaf held by this process's own
  devices (an array computed here, e.g. from the same seed on every process) cannot be put on a sharding over other
  processes' devices directly: it goes through the host, and JAX checks that every process holds the same value.
  Global arrays and host arrays go straight to ``jax.device_put``.
  """
  def one(x, s):
    if isinstance(x, jax.Array) and x.is_fully_addressable and not s.is_fully_addressable:
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.device_put(np.asarray(jax.random.key_data(x)), s)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
      return jax.device_put(np.asarray(x), s)
    return jax.device_put(x, s)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  return jax.tree.map(one, tree, shardings)


def abstract_on(tree: Any, shardings: Any) -> Any:
  """``tree``'s leaves (arrays or `jax.ShapeDtypeStruct`) as `jax.ShapeDtypeStruct` on ``shardings`` (one sharding
  for every leaf, or a tree of them like ``tree``): the inputs of a program lowered without its data."""
  sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: sds(x, shardings), tree)
  return jax.tree.map(sds, tree, shardings)


def host_get(tree: Any) -> Any:
  """``jax.device_get`` that also works in a multi-host job: an array sharded over other processes' devices is
  gathered from all of them (a collective: every process must call it at the same point)."""
  from jax.experimental import multihost_utils

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.device_get(x)
  return jax.tree.map(one, tree)


def process_local_copy(module: nnx.Module) -> nnx.Module:
  """In a multi-host job: a copy of ``module`` whose arrays are whole on this process's first device (gathered from
  all processes; every process must call it), so each process can run it on its own, e.g. for evaluation. With one
  process: ``module`` itself."""
  if jax.process_count() == 1:
    return module
  graphdef, state = nnx.split(module)
  local = jax.local_devices()[0]
  return nnx.merge(graphdef, jax.tree.map(lambda x: jax.device_put(x, local), host_get(state)))


def batch_sharding(mesh: Mesh, ndim: int, rules=DEFAULT_RULES) -> NamedSharding:
  """Sharding for a batch-major array: the leading axis over the "batch" rule, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def shard_batch(batch: Any, mesh: Mesh, rules=DEFAULT_RULES) -> Any:
  """Put a host batch (tree of arrays, global batch on every process) onto the mesh."""
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding(mesh, np.ndim(x), rules)), batch)


# --- activation constraints -----------------------------------------------------------------------


class _Context(threading.local):
  mesh: Mesh | None = None
  rules: tuple = DEFAULT_RULES


_CTX = _Context()


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES):
  """Within this context, ``constrain`` pins activations to the mesh by their logical axes."""
  prev = (_CTX.mesh, _CTX.rules)
  _CTX.mesh, _CTX.rules = mesh, rules
  try:
    with jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else contextlib.nullcontext():
      yield mesh
  finally:
    _CTX.mesh, _CTX.rules = prev


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """``with_sharding_constraint`` by logical names; a no-op outside ``use_mesh`` or on one device."""
  mesh = _CTX.mesh
  if mesh is None or mesh.size == 1:
    return x
  spec = _fit_spec(logical_to_spec(logical, _CTX.rules), x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def param_bytes_per_device(module: nnx.Module) -> dict[Any, int]:
  """Bytes of the module's arrays held by each device (to check that sharding really splits)."""
  out: dict[Any, int] = {}
  for leaf in jax.tree.leaves(nnx.state(module)):
    if isinstance(leaf, jax.Array):
      for shard in leaf.addressable_shards:
        out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out
