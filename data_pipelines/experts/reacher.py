"""Scripted reacher expert: analytic inverse kinematics of the two-link arm + joint-space PD.

The target joint angles solve fingertip = target (elbow branch kept on the current side); the
torque is a clipped PD law on the wrapped angle error. Jittable; succeeds on nearly all targets.
"""

from __future__ import annotations

import jax.numpy as jnp

from data_pipelines.experts.base import Expert
from gea_jax.envs.reacher import LINK0, LINK1

KP, KD = 5.0, 0.5


def ik(target, elbow_sign):
  """Joint angles (q0, q1) putting the fingertip at target (x, y)."""
  x, y = target[0], target[1]
  c2 = jnp.clip((x * x + y * y - LINK0**2 - LINK1**2) / (2 * LINK0 * LINK1), -1.0, 1.0)
  q1 = elbow_sign * jnp.arccos(c2)
  q0 = jnp.arctan2(y, x) - jnp.arctan2(LINK1 * jnp.sin(q1), LINK0 + LINK1 * jnp.cos(q1))
  return q0, q1


def act(state, key=None):
  ps = state.inner
  q, qd = ps.q[:2], ps.qd[:2]
  q0, q1 = ik(state.task["target"], jnp.where(q[1] >= 0, 1.0, -1.0))
  err = jnp.stack([(q0 - q[0] + jnp.pi) % (2 * jnp.pi) - jnp.pi, q1 - q[1]])
  return jnp.clip(KP * err - KD * qd, -1.0, 1.0)


def make_expert(name: str) -> Expert:
  return Expert(embodiment=name, name="ik_pd", act=act, jittable=True)
