"""The jittable renderer: shapes, analytic shapes, and that targets and bodies appear where they are."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gea_jax.envs import make
from gea_jax.envs.render import BOX, PLANE, SPHERE, BraxRenderer, Camera


def _fake_sys(geoms):
  """A System-like object with the geom_* fields the renderer reads: (type, size, pos, body, rgba)."""
  n = len(geoms)
  return types.SimpleNamespace(
      geom_type=np.array([g[0] for g in geoms]), geom_size=np.array([g[1] for g in geoms], np.float32),
      geom_pos=np.array([g[2] for g in geoms], np.float32), geom_quat=np.tile([1.0, 0, 0, 0], (n, 1)),
      geom_bodyid=np.array([g[3] for g in geoms]), geom_rgba=np.array([g[4] for g in geoms], np.float32))


def test_box_and_sphere_footprints_top_down():
  sys = _fake_sys([
      (PLANE, (0, 0, 0), (0, 0, 0), 0, (1, 1, 1, 1)),
      (BOX, (0.25, 0.5, 0.1), (-0.5, 0, 0.1), 0, (0, 0, 1, 1)),  # world-fixed box
      (SPHERE, (0.2, 0, 0), (0, 0, 0), 1, (1, 0, 0, 1)),  # on link 0
  ])
  r = BraxRenderer(sys, Camera.top_down((0, 0, 0), 1.0, size=64))
  x_pos = jnp.array([[0.5, 0.5, 0.3]])
  x_rot = jnp.array([[1.0, 0, 0, 0]])
  img = np.asarray(jax.jit(r)(x_pos, x_rot))
  assert img.shape == (64, 64, 3) and img.dtype == np.uint8
  blue = (img[..., 2] > 100) & (img[..., 0] < 50)
  rows, cols = np.nonzero(blue)
  # Box spans x in [-0.75, -0.25] -> cols [8, 24), y in [-0.5, 0.5] -> rows [16, 48).
  assert (cols.min(), cols.max() + 1, rows.min(), rows.max() + 1) == (8, 24, 16, 48)
  red = (img[..., 0] > 100) & (img[..., 2] < 50)
  rr, cc = np.nonzero(red)
  # Sphere of radius 0.2 at (0.5, 0.5): centre pixel (15.5, 47.5), radius 6.4 px.
  assert abs(rr.mean() - 15.5) < 0.6 and abs(cc.mean() - 47.5) < 0.6
  assert abs(red.sum() - np.pi * 6.4**2) < 0.1 * np.pi * 6.4**2
  # The background plane is white-ish elsewhere.
  assert img[60, 60].min() > 200


def test_unsupported_geom_type_is_a_clear_error():
  sys = _fake_sys([(5, (0.1, 0.1, 0), (0, 0, 0), 0, (1, 1, 1, 1))])  # cylinder
  with pytest.raises(ValueError, match="geom 0 has unsupported type 5"):
    BraxRenderer(sys, Camera.top_down((0, 0, 0), 1.0))


def _is_red(px):
  return px[0] > 120 and px[1] < 60 and px[2] < 60


def test_reacher_target_and_fingertip_are_where_they_are():
  env = make("reacher")
  render = jax.jit(jax.vmap(lambda ps: env.render_state(ps, None)))
  targets = np.array([[0.15, 0.1], [-0.12, -0.08], [0.0, -0.17]], np.float32)
  qs = [jnp.array([0.3 * i, 0.5, *t]) for i, t in enumerate(targets)]
  pss = [env.pipeline_init(q, jnp.zeros(4)) for q in qs]
  ps = jax.tree_util.tree_map(lambda *x: jnp.stack(x), *pss)
  imgs = np.asarray(render(ps))
  assert imgs.shape == (3, 64, 64, 3) and imgs.dtype == np.uint8
  cam = env.renderer.camera
  for i, t in enumerate(targets):
    row, col = (int(round(float(v))) for v in cam.project(np.array([t[0], t[1], 0.01])))
    assert _is_red(imgs[i, row, col]), imgs[i, row, col]
    for j, u in enumerate(targets):  # the other targets are not drawn in this image
      if j != i:
        r2, c2 = (int(round(float(v))) for v in cam.project(np.array([u[0], u[1], 0.01])))
        assert not _is_red(imgs[i, r2, c2])
    tip = np.asarray(env.tip_pos(pss[i]))
    row, col = (int(round(float(v))) for v in cam.project(tip))
    patch = imgs[i, row - 1:row + 2, col - 1:col + 2].reshape(-1, 3).astype(int)
    assert (patch[:, 2] > patch[:, 0] + 40).sum() >= 3, patch  # the fingertip is drawn blue


def test_halfcheetah_camera_follows_torso_and_draws_flag():
  env = make("halfcheetah")
  render = jax.jit(env.render_state)
  q = env.sys.init_q
  for x0 in (0.0, 3.0):
    ps = env.pipeline_init(q.at[0].set(x0), jnp.zeros(env.sys.qd_size()))
    flag_x = x0 + 0.7
    img = np.asarray(render(ps, {"flag_x": jnp.float32(flag_x)}))
    cam = env.renderer.camera
    torso = np.asarray(ps.x.pos[0])
    r, c = cam.project(np.array([flag_x, 0.0, 0.4]), track_pos=torso)
    assert _is_red(img[int(round(r)), int(round(c))])
    r, c = cam.project(torso, track_pos=torso)
    px = img[int(round(r)), int(round(c))].astype(int)
    assert abs(px[0] - 102) < 40 and px[2] < px[0], px  # brown torso, same place in both frames
    assert (int(round(r)), int(round(c))) == (31, 31) or abs(c - 31.5) < 1


def test_grid_image_shows_agent_and_objects():
  env = make("grid_pickup")
  s = jax.device_get(jax.jit(env.reset)(jax.random.PRNGKey(5)))
  img = np.asarray(s.obs["image"])
  c = env.cell
  r0, c0 = (int(v) for v in s.inner["agent"].position)
  cell = img[r0 * c:(r0 + 1) * c, c0 * c:(c0 + 1) * c]
  assert (cell.min(-1) >= 245).sum() >= c  # white agent triangle
  grid = s.inner["grid"]
  from gea_jax.envs.grid import _RGB
  rr, cc = np.nonzero(np.all(grid == np.asarray(s.task["obj_a"], grid.dtype), -1))
  cell = img[rr[0] * c:(rr[0] + 1) * c, cc[0] * c:(cc[0] + 1) * c].reshape(-1, 3)
  want = np.asarray(_RGB[int(s.task["obj_a"][1])])
  assert (np.abs(cell.astype(int) - want).sum(-1) == 0).sum() >= 4  # object's colour in its cell
