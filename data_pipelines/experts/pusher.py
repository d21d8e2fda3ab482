"""Scripted pusher expert: damped-least-squares IK control of the wrist towards a push point.

The wrist (crossbar of the U-shaped gripper, link `r_wrist_roll_link`) is driven by
tau = Kp J^T (J J^T + lam^2 I)^-1 e - Kd qd, e = p* - p clipped to `clip`, with J from
`jax.jacfwd` of brax's forward kinematics. The push point p* comes from a stateless rule, re-evaluated
every step from the current puck position (so a puck that drifts off the line is re-approached):

* aligned (wrist low, behind the puck on the puck -> goal line, within `lat_tol` of it): drive through
  the puck towards the goal, to `min(drive, goal_gain * dist + 2 cm)` past the puck centre, so the push
  slows down as the puck nears the goal instead of shooting it past;
* behind the puck but off the line (within `lat_tol2`): slide sideways at table height to the point
  `back` behind it, without lifting;
* otherwise: travel at `z_high` to that point and descend there; when low and within `r_clear` of the
  puck on the wrong side, lift in place first, so the arm does not sweep the puck away.

Measured (100-step episodes, `experts.success_rate`): 64.6% on 512 fresh episodes (seeds 200000..200511,
those of `experiments/rvq_levels.py`; the earlier controller: 52.3% there) and 72% on the 128 tuning episodes.
Its failures are mostly pucks close to the arm's base or in the far corner with the goal towards the base,
where the wrist cannot get behind the puck at table height. Filter demonstrations by `success`, or
replace it with a PPO-trained policy via `experts.register_policy("pusher", fn)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines.experts.base import Expert

PARAM_NAMES = ("kp", "kd", "back", "drive", "z_low", "z_high", "lat_tol", "tol", "lam", "goal_gain", "clip",
               "lat_tol2", "r_clear", "contact")
# Set by hand from failure diagnoses on seeds 600000..600383 only (disjoint from the tests' seeds 0.., and
# from rvq_levels' seeds 0.., 100000.., 200000..); a small local search there found nothing clearly better.
DEFAULT_PARAMS = np.array([30.0, 2.0, 0.09, 0.15, -0.25, -0.05, 0.05, 0.06, 0.05, 1.5, 0.1, 0.08, 0.15, 0.07],
                          np.float32)


def make_act(env, params=DEFAULT_PARAMS):
  from brax import kinematics
  sys = env.sys
  wrist = env.link_index("r_wrist_roll_link")
  obj = env.link_index("object")

  default = np.asarray(params, np.float32)

  def act(state, key=None, params=None):
    params = jnp.asarray(default if params is None else params)
    (kp, kd, back, drive, z_low, z_high, lat_tol, tol, lam, goal_gain, clip, lat_tol2, r_clear,
     contact) = (params[i] for i in range(len(PARAM_NAMES)))
    ps = state.inner

    def fk(q7):
      x, _ = kinematics.forward(sys, ps.q.at[:7].set(q7), ps.qd)
      return x.pos[wrist]

    q7 = ps.q[:7]
    p = fk(q7)
    jac = jax.jacfwd(fk)(q7)  # [3, 7]
    puck = ps.x.pos[obj, :2]
    d = state.task["goal"] - puck
    dist = jnp.linalg.norm(d)
    u = d / (dist + 1e-6)
    rel = p[:2] - puck
    along = rel @ u
    lateral = jnp.linalg.norm(rel - along * u)
    behind = puck - u * back
    low = p[2] < z_low + 0.05
    aligned = (along < -contact + 0.04) & (along > -back - 0.06) & (lateral < lat_tol) & low
    near_behind = jnp.linalg.norm(p[:2] - behind) < tol
    slide = (along < -contact + 0.02) & (lateral < lat_tol2) & low  # behind the puck: realign at table height
    go_low = aligned | near_behind | slide
    push_xy = puck + u * jnp.minimum(drive, goal_gain * dist + 0.02)
    target_xy = jnp.where(aligned, push_xy, behind)
    target_z = jnp.where(go_low, z_low, z_high)
    lift_first = (~go_low) & (p[2] < z_high - 0.05) & (jnp.linalg.norm(rel) < r_clear)
    target_xy = jnp.where(lift_first, p[:2], target_xy)
    err = jnp.concatenate([target_xy, target_z[None]]) - p
    err = err * jnp.minimum(1.0, clip / (jnp.linalg.norm(err) + 1e-6))
    dq = jac.T @ jnp.linalg.solve(jac @ jac.T + lam**2 * jnp.eye(3), err)
    tau = kp * dq - kd * ps.qd[:7]
    return jnp.clip(tau, -1.0, 1.0)

  return act


def make_expert(name: str) -> Expert:
  from gea_jax.envs import registry
  return Expert(embodiment=name, name="jacobian_push", act=make_act(registry.make(name)), jittable=True)
