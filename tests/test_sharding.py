"""Mesh construction and logical-axis rules (8 fake CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from gea_jax import sharding


def test_mesh_fills_minus_one():
  assert sharding.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
  assert sharding.resolve_mesh_shape((2, -1, 1), 8) == (2, 4, 1)
  mesh = sharding.make_mesh((2, 4, 1))
  assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (2, 4, 1)


@pytest.mark.parametrize("shape,msg", [((3, -1, 1), "not divisible"), ((2, 2, 1), "needs 4 devices"),
                                       ((-1, -1, 1), "at most one -1"), ((1, 1), "3 entries")])
def test_mesh_errors(shape, msg):
  with pytest.raises(ValueError, match=msg):
    sharding.resolve_mesh_shape(shape, 8)


def test_logical_rules():
  rules = sharding.DEFAULT_RULES
  assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)
  assert sharding.logical_to_spec((None, "head_dim"), rules) == P(None, None)
  custom = sharding.rules_from_config([["embed", None], ["mlp", ["fsdp", "tensor"]]])
  assert sharding.logical_to_spec(("embed", "mlp"), custom) == P(None, ("fsdp", "tensor"))
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.rules_from_config([["embed", "model"]])


class _Mlp(nnx.Module):
  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.up = nnx.Linear(64, 256, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")), rngs=rngs)
    self.down = nnx.Linear(256, 64, kernel_init=nnx.with_partitioning(init, ("mlp", "embed")), rngs=rngs)

  def __call__(self, x):
    return self.down(jax.nn.gelu(self.up(x)))


def test_create_sharded_splits_params_and_matches_single_device():
  mesh = sharding.make_mesh((1, 8, 1))
  model = sharding.create_sharded(lambda: _Mlp(nnx.Rngs(0)), mesh)
  kernels = [model.up.kernel.get_value(), model.down.kernel.get_value()]
  total = sum(k.nbytes for k in kernels)
  per_device = {}
  for k in kernels:
    for shard in k.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  assert len(per_device) == 8 and all(b == total // 8 for b in per_device.values())

  reference = _Mlp(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (8, 64))
  mesh2 = sharding.make_mesh((2, 4, 1))
  sharded = sharding.shard_module(_Mlp(nnx.Rngs(0)), mesh2)
  xs = sharding.shard_batch(x, mesh2)
  out = nnx.jit(lambda m, x: m(x))(sharded, xs)
  np.testing.assert_allclose(np.asarray(out), np.asarray(reference(x)), atol=1e-5)


def test_create_sharded_inside_use_mesh_equals_outside():
  """Under `use_mesh` (a global mesh) the logical axes still go through the rules, not read as mesh axes."""
  mesh = sharding.make_mesh((2, 4, 1))
  outside = sharding.create_sharded(lambda: _Mlp(nnx.Rngs(0)), mesh)
  with sharding.use_mesh(mesh):
    inside = sharding.create_sharded(lambda: _Mlp(nnx.Rngs(0)), mesh)
  for a, b in ((inside.up.kernel, outside.up.kernel), (inside.down.kernel, outside.down.kernel)):
    a, b = a.get_value(), b.get_value()
    assert a.sharding == b.sharding and a.sharding.spec != P()
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_constrain_is_noop_without_mesh():
  x = jnp.ones((4, 8))
  assert sharding.constrain(x, ("batch", "embed")) is x


def test_fake_cpu_devices_are_set_before_jax_starts():
  """conftest's 8 devices come with the scheduler flag; once the backend runs, a late call fails loudly."""
  import os

  from gea_jax.fake_devices import NO_CONCURRENT_SCHEDULER, use_fake_cpu_devices
  assert jax.device_count() == 8 and NO_CONCURRENT_SCHEDULER in os.environ["XLA_FLAGS"]
  flags = os.environ["XLA_FLAGS"]
  with pytest.raises(RuntimeError, match="already initialized"):
    use_fake_cpu_devices(4)
  with pytest.raises(ValueError, match="count must be >= 1"):
    use_fake_cpu_devices(0)
  assert os.environ["XLA_FLAGS"] == flags
