"""Shared plumbing for Brax bodies (positional backend): physics system, stepping, rendering.

A `BraxBody` wraps one of brax's pipeline environments only for its `System` (with brax's own
positional-backend timestep and gear settings) and its `pipeline_init` / `pipeline_step`; tasks,
rewards, success tests, observations and instructions are defined by the subclasses.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from gea_jax.envs.base import Embodiment
from gea_jax.envs.render import BraxRenderer


def load_brax_env(name: str):
  """brax's PipelineEnv `name` on the positional backend (imports brax lazily)."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from brax import envs as brax_envs
    with mjx_models_on_this_process():
      return brax_envs.get_environment(name, backend="positional")


@contextlib.contextmanager
def mjx_models_on_this_process():
  """brax's loader calls ``mujoco.mjx.put_model`` without a device, which then picks ``jax.devices()[0]``: in a
  multi-host job that device belongs to process 0, so on every other process the System's arrays would hold no data
  (any use fails with "spans non-addressable devices"). Within this context the loader's ``put_model`` puts the
  model on this process's first device instead; with one process nothing changes."""
  if jax.process_count() == 1:
    yield
    return
  from brax.io import mjcf
  original = mjcf.mjx.put_model
  mjcf.mjx.put_model = functools.partial(original, device=jax.local_devices()[0])
  try:
    yield
  finally:
    mjcf.mjx.put_model = original


class BraxBody(Embodiment):
  """Base class: holds the brax env, its System, and a renderer built by `make_renderer`."""

  brax_name: str = ""

  def __init__(self, image_size: int = 64):
    if image_size < 8:
      raise ValueError(f"{type(self).__name__}: image_size must be >= 8, got {image_size}")
    self._env = load_brax_env(self.brax_name)
    self.sys = self._env.sys
    self.dt = float(self._env.dt)
    self.image_size = int(image_size)
    self.renderer: BraxRenderer = self.make_renderer(self.image_size)

  def make_renderer(self, image_size: int) -> BraxRenderer:
    raise NotImplementedError

  def link_index(self, name: str) -> int:
    return list(self.sys.link_names).index(name)

  def pipeline_init(self, q, qd):
    return self._env.pipeline_init(q, qd)

  def pipeline_step(self, ps, ctrl):
    return self._env.pipeline_step(ps, ctrl)

  def clip_action(self, action):
    a = self.spec.action_space
    action = jnp.asarray(action, jnp.float32).reshape(a.dim)
    return jnp.clip(action, np.asarray(a.low, np.float32), np.asarray(a.high, np.float32))

  def render_state(self, ps, task) -> jax.Array:
    """uint8 [H, W, 3] image of a pipeline state (override to add extras / tracking)."""
    return self.renderer(ps.x.pos, ps.x.rot)


def direction_words(dx: float, dy: float) -> str:
  """One of 8 compass-like regions of a top-down image for the vector (dx, dy) (x right, y up)."""
  ang = float(np.arctan2(dy, dx))
  sector = int(np.round(ang / (np.pi / 4))) % 8
  return ("on the right", "on the upper right", "at the top", "on the upper left", "on the left",
          "on the lower left", "at the bottom", "on the lower right")[sector]


def region_words(x: float, y: float, x_range: tuple[float, float], y_range: tuple[float, float]) -> str:
  """Region of a rectangle (thirds in x and y) in words: "near the upper left", "near the centre"."""
  fx = (x - x_range[0]) / (x_range[1] - x_range[0])
  fy = (y - y_range[0]) / (y_range[1] - y_range[0])
  h = "left" if fx < 1 / 3 else ("right" if fx > 2 / 3 else "")
  v = "bottom" if fy < 1 / 3 else ("top" if fy > 2 / 3 else "")
  if h and v:
    return f"near the {'upper' if v == 'top' else 'lower'} {h}"
  if h or v:
    return f"near the {h or v}"
  return "near the centre"
