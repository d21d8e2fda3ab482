"""Loop-aware FLOP counting of traced programs (gea_jax/tools/jaxpr_flops.py) against hand-counted matmuls and
convolutions, and against XLA's cost analysis, which counts a loop body once."""

import jax
import jax.numpy as jnp
import pytest

from gea_jax.tools.jaxpr_flops import jaxpr_flops


def _traced(f, *args):
  return jax.jit(f).trace(*args)


def _xla_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_a_loop_body_counts_as_often_as_it_runs():
  x, w = jnp.ones((64, 32)), jnp.ones((32, 32))
  matmul = 2 * 64 * 32 * 32
  one = _traced(lambda x, w: x @ w, x, w)
  scan = _traced(lambda x, w: jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=10)[0], x, w)
  nested = _traced(lambda x, w: jax.lax.scan(
      lambda c, _: (jax.lax.scan(lambda d, _: (jnp.tanh(d @ w), None), c, None, length=3)[0], None), x, None,
      length=4)[0], x, w)
  assert jaxpr_flops(one.jaxpr).flops == matmul == _xla_flops(one.lower().compile())
  assert jaxpr_flops(scan.jaxpr).flops == 10 * matmul
  assert _xla_flops(scan.lower().compile()) == pytest.approx(matmul, rel=1e-3)  # XLA: the body once
  assert jaxpr_flops(nested.jaxpr).flops == 12 * matmul
  # a gradient's matmuls are in the differentiated program's jaxpr: forward 1, backward 2 (into x and into w)
  grad = _traced(jax.grad(lambda w, x: jnp.sum(jnp.tanh(x @ w)), argnums=(0, 1)), w, x)
  assert jaxpr_flops(grad.jaxpr).flops == 3 * matmul
  # a while loop's length is a run-time value: its body is counted once, and the loop is reported
  loop = _traced(lambda x, w: jax.lax.while_loop(lambda c: c[1] < jnp.sum(c[0]), lambda c: (c[0] @ w, c[1] + 1),
                                                 (x, 0))[0], x, w)
  counts = jaxpr_flops(loop.jaxpr)
  assert (counts.flops, counts.while_loops) == (matmul, 1)


def test_convolutions_batched_dots_and_branches():
  img, k = jnp.ones((2, 16, 16, 3)), jnp.ones((3, 3, 3, 8))
  conv = _traced(lambda a, b: jax.lax.conv_general_dilated(
      a, b, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")), img, k)
  assert jaxpr_flops(conv.jaxpr).flops == 2 * (2 * 14 * 14 * 8) * (3 * 3 * 3)
  a, b = jnp.ones((4, 5, 6)), jnp.ones((4, 6, 7))
  bmm = _traced(lambda a, b: jnp.einsum("bij,bjk->bik", a, b), a, b)
  assert jaxpr_flops(bmm.jaxpr).flops == 2 * 4 * 5 * 6 * 7
  x = jnp.ones((8, 8))
  branch = _traced(lambda p, x: jax.lax.cond(p, lambda x: x @ x @ x, lambda x: x, x), True, x)
  assert jaxpr_flops(branch.jaxpr).flops == 2 * (2 * 8 * 8 * 8)  # the costlier branch
