"""`pusher`: a 7-DoF arm (brax Pusher) that must push a white puck onto a green goal disc.

Unlike brax's Pusher (fixed goal), both the puck and the goal are sampled per episode, at least
`min_goal_dist` apart. Action: 7 joint torques in [-1, 1] (mapped to the motors' [-2, 2]). State
(23): joint angles (7), joint velocities (7), fingertip, puck and goal positions (3 each). Image:
top-down view of the table (image up = world +y, the arm's base at the bottom). Success: the
puck's centre within `success_radius` of the goal's; the episode then terminates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gea_jax.envs.base import EnvState, check_split, finish_step, split_key
from gea_jax.envs.brax_body import BraxBody, region_words
from gea_jax.envs.render import BraxRenderer, Camera
from gea_jax.envs.spec import ActionSpace, EmbodimentSpec

OBJECT_HOME = np.array([0.45, -0.05])  # world xy of the puck / goal bodies at q offset 0
SLIDE_X = (-0.2, 0.2)  # offsets sampled for puck and goal (world x = home + offset)
SLIDE_Y = (-0.3, 0.0)
_TEMPLATES = (
    "push the white puck to the green goal {where}",
    "slide the puck onto the green circle {where}",
    "move the white puck to the green target {where}",
)


class Pusher(BraxBody):
  brax_name = "pusher"

  def __init__(self, image_size: int = 64, max_episode_steps: int = 100, success_radius: float = 0.06,
               min_goal_dist: float = 0.17):
    self.spec = EmbodimentSpec(
        name="pusher",
        action_space=ActionSpace("continuous", 7, (-1.0,) * 7, (1.0,) * 7),
        image_shape=(image_size, image_size, 3), state_dim=23, max_episode_steps=max_episode_steps,
        description="a seven-joint robot arm over a table seen from above; actions are its seven joint torques")
    self.success_radius = success_radius
    self.min_goal_dist = min_goal_dist
    super().__init__(image_size)
    self._tip_idx = self.link_index("r_wrist_flex_link")
    self._obj_idx = self.link_index("object")
    self._goal_idx = self.link_index("goal")
    self._inertia_pos = self.sys.link.inertia.transform.pos

  def make_renderer(self, image_size):
    types = np.asarray(self.sys.geom_type)
    body = np.asarray(self.sys.geom_bodyid)
    names = list(self.sys.link_names)
    colors = {0: (0.62, 0.6, 0.56)}
    for g in range(len(types)):
      if body[g] == names.index("object") + 1:
        colors[g] = (1.0, 1.0, 1.0)
      elif body[g] == names.index("goal") + 1:
        colors[g] = (0.1, 0.8, 0.2)
      elif body[g] > 0:
        colors.setdefault(g, (0.3, 0.3, 0.38))
    return BraxRenderer(self.sys, Camera.top_down((0.4, -0.22, 0.0), 0.4, image_size), colors=colors)

  def _positions(self, ps):
    from brax import base
    x_i = ps.x.vmap().do(base.Transform.create(pos=self._inertia_pos))
    return x_i.pos[self._tip_idx], x_i.pos[self._obj_idx], x_i.pos[self._goal_idx]

  def _obs(self, ps):
    tip, obj, goal = self._positions(ps)
    state = jnp.concatenate([ps.q[:7], ps.qd[:7], tip, obj, goal]).astype(jnp.float32)
    return {"image": self.render_state(ps, None), "state": state}

  def reset(self, key, task_split="train"):
    check_split(task_split, self.task_splits, "pusher")
    key = split_key(key, task_split)
    k_obj, k_goal, k_qd, k_t = jax.random.split(key, 4)
    lo = jnp.array([SLIDE_X[0], SLIDE_Y[0]])
    hi = jnp.array([SLIDE_X[1], SLIDE_Y[1]])
    obj = jax.random.uniform(k_obj, (2,), minval=lo, maxval=hi)
    cands = jax.random.uniform(k_goal, (16, 2), minval=lo, maxval=hi)
    ok = jnp.linalg.norm(cands - obj, axis=-1) >= self.min_goal_dist
    goal = cands[jnp.argmax(ok)]  # first far-enough candidate (one exists with overwhelming probability)
    goal = jnp.where(ok.any(), goal, obj + jnp.array([0.0, self.min_goal_dist]))
    # q layout: 7 arm joints, puck (slide y, slide x), goal (slide y, slide x).
    q = self.sys.init_q.at[-4:].set(jnp.array([obj[1], obj[0], goal[1], goal[0]]))
    qd = jax.random.uniform(k_qd, (self.sys.qd_size(),), minval=-0.005, maxval=0.005).at[-4:].set(0.0)
    ps = self.pipeline_init(q, qd)
    task = {"goal": goal + jnp.asarray(OBJECT_HOME, jnp.float32), "template": jax.random.randint(k_t, (), 0, 3)}
    z = jnp.zeros((), jnp.float32)
    f = jnp.zeros((), bool)
    return EnvState(obs=self._obs(ps), reward=z, done=f, terminal=f, success=f, step=jnp.zeros((), jnp.int32),
                    task_id=jnp.zeros((), jnp.int32), task=task, inner=ps)

  def step(self, state: EnvState, action) -> EnvState:
    action = self.clip_action(action)
    lo, hi = self.sys.actuator.ctrl_range[:, 0], self.sys.actuator.ctrl_range[:, 1]
    ps = self.pipeline_step(state.inner, (action + 1) * (hi - lo) * 0.5 + lo)
    tip, obj, goal = self._positions(ps)
    dist = jnp.linalg.norm(obj[:2] - goal[:2])
    success = dist < self.success_radius
    reward = -dist - 0.5 * jnp.linalg.norm(obj - tip) - 0.01 * jnp.sum(action**2) + success.astype(jnp.float32)
    return finish_step(state, obs=self._obs(ps), reward=reward, success=success, inner=ps,
                       max_steps=self.spec.max_episode_steps)

  def describe_task(self, task, task_id):
    x, y = (float(v) for v in np.asarray(task["goal"]))
    lo = OBJECT_HOME + np.array([SLIDE_X[0], SLIDE_Y[0]])
    hi = OBJECT_HOME + np.array([SLIDE_X[1], SLIDE_Y[1]])
    where = region_words(x, y, (lo[0], hi[0]), (lo[1], hi[1]))
    return _TEMPLATES[int(task["template"]) % len(_TEMPLATES)].format(where=where)
