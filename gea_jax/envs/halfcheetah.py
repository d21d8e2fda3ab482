"""`halfcheetah`: brax's planar HalfCheetah, asked to run forward past a red flag d metres ahead.

The flag distance d (whole metres in [min_dist, max_dist]) is sampled per episode. Action: 6 joint
torques in [-1, 1]. State (18): brax's observation (joint positions without root x (8), velocities
(9)) plus the distance left to the flag. Image: side view, pitched down, following the torso
along x, over a checkered floor; the flag is drawn as a red pole. Reward: forward velocity minus
0.1 |a|^2 (brax's). Success: the torso has passed the flag; the episode then terminates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gea_jax.envs.base import EnvState, check_split, finish_step, split_key
from gea_jax.envs.brax_body import BraxBody
from gea_jax.envs.render import BraxRenderer, Camera, Primitive
from gea_jax.envs.spec import ActionSpace, EmbodimentSpec

FLAG_HALF_HEIGHT = 0.4
_TEMPLATES = (
    "run forward to the red flag {d} metres ahead",
    "move forward past the red flag, {d} metres away",
    "run {d} metres forward, past the red flag",
)


class HalfCheetah(BraxBody):
  brax_name = "halfcheetah"

  def __init__(self, image_size: int = 64, max_episode_steps: int = 200, min_dist: int = 2, max_dist: int = 6):
    if not 0 < min_dist <= max_dist:
      raise ValueError(f"halfcheetah: need 0 < min_dist <= max_dist, got {min_dist}, {max_dist}")
    self.spec = EmbodimentSpec(
        name="halfcheetah",
        action_space=ActionSpace("continuous", 6, (-1.0,) * 6, (1.0,) * 6),
        image_shape=(image_size, image_size, 3), state_dim=18, max_episode_steps=max_episode_steps,
        description="a two-legged planar runner seen from the side; actions are the torques of its six leg joints")
    self.dist_range = (int(min_dist), int(max_dist))
    super().__init__(image_size)

  def make_renderer(self, image_size):
    flag = Primitive("capsule", (0.03, FLAG_HALF_HEIGHT), (0.95, 0.05, 0.05))
    # The floor is drawn as a 1 m wide track (|y| <= 0.5) so that the sky shows above it.
    return BraxRenderer(self.sys, Camera.side((0.0, 0.0, 0.45), 1.0, pitch_deg=20.0, size=image_size),
                        colors={0: (0.8, 0.8, 0.74)}, sizes={0: (40.0, 0.5)}, extras=[flag], checker=0.5)

  def render_state(self, ps, task):
    flag = jnp.stack([task["flag_x"], 0.0, FLAG_HALF_HEIGHT])[None]
    return self.renderer(ps.x.pos, ps.x.rot, extra_pos=flag, track_pos=ps.x.pos[0])

  def _obs(self, ps, task):
    state = jnp.concatenate([ps.q[1:], ps.qd, (task["flag_x"] - ps.x.pos[0, 0])[None]]).astype(jnp.float32)
    return {"image": self.render_state(ps, task), "state": state}

  def reset(self, key, task_split="train"):
    check_split(task_split, self.task_splits, "halfcheetah")
    key = split_key(key, task_split)
    k_q, k_qd, k_d, k_t = jax.random.split(key, 4)
    q = self.sys.init_q + jax.random.uniform(k_q, (self.sys.q_size(),), minval=-0.1, maxval=0.1)
    qd = 0.1 * jax.random.normal(k_qd, (self.sys.qd_size(),))
    ps = self.pipeline_init(q, qd)
    d = jax.random.randint(k_d, (), self.dist_range[0], self.dist_range[1] + 1)
    task = {"distance": d, "flag_x": ps.x.pos[0, 0] + d.astype(jnp.float32),
            "template": jax.random.randint(k_t, (), 0, len(_TEMPLATES))}
    z = jnp.zeros((), jnp.float32)
    f = jnp.zeros((), bool)
    return EnvState(obs=self._obs(ps, task), reward=z, done=f, terminal=f, success=f,
                    step=jnp.zeros((), jnp.int32), task_id=jnp.zeros((), jnp.int32), task=task, inner=ps)

  def step(self, state: EnvState, action) -> EnvState:
    action = self.clip_action(action)
    ps0 = state.inner
    ps = self.pipeline_step(ps0, action)
    velocity = (ps.x.pos[0, 0] - ps0.x.pos[0, 0]) / self.dt
    reward = velocity - 0.1 * jnp.sum(action**2)
    success = ps.x.pos[0, 0] >= state.task["flag_x"]
    return finish_step(state, obs=self._obs(ps, state.task), reward=reward, success=success, inner=ps,
                       max_steps=self.spec.max_episode_steps)

  def describe_task(self, task, task_id):
    return _TEMPLATES[int(task["template"]) % len(_TEMPLATES)].format(d=int(task["distance"]))
