"""`reacher`: a two-link planar arm (brax Reacher) that must touch a randomly placed red target.

Action: 2 joint torques in [-1, 1]. State (11): cos/sin of the joint angles, target xy, joint
velocities, fingertip - target. Image: top-down view of the arena (image up = world +y). Success:
fingertip within `success_radius` of the target; the episode then terminates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gea_jax.envs.base import EnvState, check_split, finish_step, split_key
from gea_jax.envs.brax_body import BraxBody, direction_words
from gea_jax.envs.render import BraxRenderer, Camera
from gea_jax.envs.spec import ActionSpace, EmbodimentSpec

LINK0, LINK1 = 0.1, 0.11  # joint0 -> joint1, joint1 -> fingertip centre (m)
_TEMPLATES = (
    "move the fingertip to the red target {where}",
    "reach the red dot {where} with the fingertip",
    "touch the red target {where}",
)


class Reacher(BraxBody):
  brax_name = "reacher"

  def __init__(self, image_size: int = 64, max_episode_steps: int = 100, success_radius: float = 0.02,
               min_target_radius: float = 0.07, max_target_radius: float = 0.19):
    self.spec = EmbodimentSpec(
        name="reacher",
        action_space=ActionSpace("continuous", 2, (-1.0, -1.0), (1.0, 1.0)),
        image_shape=(image_size, image_size, 3), state_dim=11, max_episode_steps=max_episode_steps,
        description="a two-link planar arm seen from above; actions are the torques of its two joints")
    self.success_radius = success_radius
    self.target_radius = (min_target_radius, max_target_radius)
    super().__init__(image_size)

  def make_renderer(self, image_size):
    colors = {0: (0.92, 0.92, 0.9), 9: (0.95, 0.05, 0.05), 8: (0.15, 0.15, 0.6)}
    for g in range(1, 5):
      colors[g] = (0.35, 0.35, 0.35)
    return BraxRenderer(self.sys, Camera.top_down((0.0, 0.0, 0.0), 0.33, image_size), colors=colors,
                        sizes={9: (self.success_radius,), 8: (0.015,)})

  def tip_pos(self, ps):
    from brax import math
    return ps.x.pos[1] + math.rotate(jnp.array([LINK1, 0.0, 0.0]), ps.x.rot[1])

  def _obs(self, ps):
    theta = ps.q[:2]
    tip_to_target = self.tip_pos(ps) - ps.x.pos[2]
    state = jnp.concatenate([jnp.cos(theta), jnp.sin(theta), ps.q[2:], ps.qd[:2], tip_to_target])
    return {"image": self.render_state(ps, None), "state": state.astype(jnp.float32)}

  def reset(self, key, task_split="train"):
    check_split(task_split, self.task_splits, "reacher")
    key = split_key(key, task_split)
    k_q, k_qd, k_r, k_a, k_t = jax.random.split(key, 5)
    q = self.sys.init_q + jax.random.uniform(k_q, (self.sys.q_size(),), minval=-0.1, maxval=0.1)
    qd = jax.random.uniform(k_qd, (self.sys.qd_size(),), minval=-0.005, maxval=0.005)
    r = jax.random.uniform(k_r, minval=self.target_radius[0], maxval=self.target_radius[1])
    ang = jax.random.uniform(k_a, minval=0.0, maxval=2 * jnp.pi)
    target = jnp.stack([r * jnp.cos(ang), r * jnp.sin(ang)])
    q = q.at[2:].set(target)
    qd = qd.at[2:].set(0.0)
    ps = self.pipeline_init(q, qd)
    task = {"target": target, "template": jax.random.randint(k_t, (), 0, len(_TEMPLATES))}
    z = jnp.zeros((), jnp.float32)
    f = jnp.zeros((), bool)
    return EnvState(obs=self._obs(ps), reward=z, done=f, terminal=f, success=f, step=jnp.zeros((), jnp.int32),
                    task_id=jnp.zeros((), jnp.int32), task=task, inner=ps)

  def step(self, state: EnvState, action) -> EnvState:
    action = self.clip_action(action)
    ps = self.pipeline_step(state.inner, action)
    dist = jnp.linalg.norm(self.tip_pos(ps)[:2] - ps.x.pos[2, :2])
    success = dist < self.success_radius
    reward = -dist - 0.05 * jnp.sum(action**2) + success.astype(jnp.float32)
    return finish_step(state, obs=self._obs(ps), reward=reward, success=success, inner=ps,
                       max_steps=self.spec.max_episode_steps)

  def describe_task(self, task, task_id):
    x, y = (float(v) for v in np.asarray(task["target"]))
    where = direction_words(x, y)
    if np.hypot(x, y) < 0.11:
      where += ", close to the base"
    return _TEMPLATES[int(task["template"]) % len(_TEMPLATES)].format(where=where)
