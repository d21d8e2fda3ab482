"""Matmul and convolution FLOPs of a traced JAX program, with every loop body counted as often as it runs.

XLA's ``compiled.cost_analysis()["flops"]`` counts a ``while`` loop's body once, whatever its trip count: a
``lax.scan`` of 10 matmuls reports the FLOPs of one (measured on this jax). PPO's collector (a scan over the env
steps) and update (scans over epochs and minibatches) are such loops. The compiled TPU program does not name its
loops' trip counts, and XLA:TPU rewrites batched matmuls into dilated convolutions, so the count is taken from the
program's jaxpr instead (``jax.jit(f).trace(*args).jaxpr``), before partitioning: every ``dot_general``
(2 x output elements x contracted size) and ``conv_general_dilated`` (2 x output elements x kernel window x input
features per group), a ``scan``'s body times its length, a ``cond`` at its costliest branch, a ``while_loop``'s body
once (its trip count is a run-time value: counted in ``while_loops``). The gradient's matmuls are in the jaxpr of a
differentiated program, so they are counted too. Elementwise work is not (a transformer's FLOPs are its matmuls).

    counts = jaxpr_flops(jax.jit(f).trace(*args).jaxpr)
    counts.flops          # the whole program, all devices together
    counts.while_loops    # loops of unknown length, their bodies counted once
"""

from __future__ import annotations

import dataclasses
import math

from jax.extend import core as jex_core


@dataclasses.dataclass(frozen=True)
class FlopCounts:
  flops: float       # dots + convolutions of one run of the program (all devices together)
  while_loops: int   # while loops met (their bodies counted once)

  def __add__(self, other: "FlopCounts") -> "FlopCounts":
    return FlopCounts(self.flops + other.flops, self.while_loops + other.while_loops)

  def __mul__(self, times: float) -> "FlopCounts":
    return FlopCounts(self.flops * times, self.while_loops)


_NONE = FlopCounts(0.0, 0)


def _dot(eqn) -> float:
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  lhs = eqn.invars[0].aval.shape
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)


def _conv(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
  window = math.prod(rhs[d] for d in spec[2:])
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * window * rhs[spec[1]]


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def jaxpr_flops(jaxpr) -> FlopCounts:
  """Matmul + convolution FLOPs of one run of ``jaxpr`` (a Jaxpr or ClosedJaxpr); see the module docstring."""
  if isinstance(jaxpr, jex_core.ClosedJaxpr):
    jaxpr = jaxpr.jaxpr
  total = _NONE
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      total += FlopCounts(_dot(eqn), 0)
    elif name == "conv_general_dilated":
      total += FlopCounts(_conv(eqn), 0)
    elif name == "scan":
      total += jaxpr_flops(eqn.params["jaxpr"]) * int(eqn.params["length"])
    elif name == "cond":
      branches = [jaxpr_flops(b) for b in eqn.params["branches"]]
      total += max(branches, key=lambda c: c.flops)
    elif name == "while":
      body = jaxpr_flops(eqn.params["body_jaxpr"]) + jaxpr_flops(eqn.params["cond_jaxpr"])
      total += FlopCounts(body.flops, body.while_loops + 1)
    else:  # calls (jit, checkpoint, custom_jvp / custom_vjp, ...): their inner jaxprs run once
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          total += jaxpr_flops(sub)
  return total
