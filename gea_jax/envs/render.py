"""A small jittable ray-caster for Brax pipeline states: planes, spheres, capsules and boxes.

Every pixel of an orthographic camera shoots one ray; each geom of the Brax `System` (type, size,
local pose, parent body, colour) is intersected analytically in its own frame, posed by the
pipeline state's `x.pos` / `x.rot`; the nearest hit is flat-shaded (ambient + Lambert). Extra
primitives whose positions come with each call (goal flags, ...) are drawn the same way.

    r = BraxRenderer(sys, Camera.top_down(center=(0, 0, 0), half_extent=0.35))
    image = r(pipeline_state.x.pos, pipeline_state.x.rot)          # uint8 [64, 64, 3]
    images = jax.vmap(r)(batched_x_pos, batched_x_rot)             # uint8 [B, 64, 64, 3]

`Camera.project(world_points)` gives the pixel (row, col) of a world point, used by tests to
check that the target is drawn where it is.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# MuJoCo geom type ids (mjtGeom) as stored in brax's System.geom_type.
PLANE, HFIELD, SPHERE, CAPSULE, ELLIPSOID, CYLINDER, BOX = 0, 1, 2, 3, 4, 5, 6
_KIND_NAMES = {PLANE: "plane", SPHERE: "sphere", CAPSULE: "capsule", BOX: "box"}
_BIG = 1e9


@dataclasses.dataclass(frozen=True)
class Camera:
  """Orthographic camera: looks along `forward` from `center`, showing a square of +-half_extent.

  `track` lists the world axes (0=x, 1=y, 2=z) along which the camera follows a given point
  (e.g. the torso of a runner); the point is passed to `BraxRenderer.__call__` as `track_pos`.
  """

  center: tuple[float, float, float]
  forward: tuple[float, float, float]
  up: tuple[float, float, float]
  half_extent: float
  height: int = 64
  width: int = 64
  track: tuple[int, ...] = ()

  @classmethod
  def top_down(cls, center, half_extent: float, size: int = 64) -> "Camera":
    """Looking down -z; image up is world +y, image right is world +x."""
    return cls(tuple(center), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0), half_extent, size, size)

  @classmethod
  def side(cls, center, half_extent: float, pitch_deg: float = 15.0, size: int = 64,
           track: tuple[int, ...] = (0,)) -> "Camera":
    """Looking along +y (the body's left side), pitched down; image right is world +x."""
    p = np.deg2rad(pitch_deg)
    fwd = (0.0, float(np.cos(p)), -float(np.sin(p)))
    up = (0.0, float(np.sin(p)), float(np.cos(p)))
    return cls(tuple(center), fwd, up, half_extent, size, size, track)

  def basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    f = np.asarray(self.forward, np.float32)
    f = f / np.linalg.norm(f)
    u = np.asarray(self.up, np.float32)
    u = u - f * (u @ f)
    u = u / np.linalg.norm(u)
    r = np.cross(f, u)
    return f, u, r

  def project(self, points, track_pos=None):
    """World points [..., 3] -> (row, col) float pixel coordinates (works on numpy or jax arrays)."""
    xp = jnp if isinstance(points, jax.Array) else np
    f, u, r = self.basis()
    c = self._center(track_pos, xp)
    d = points - c
    col = ((d @ r) / self.half_extent + 1.0) * 0.5 * self.width - 0.5
    row = (1.0 - (d @ u) / self.half_extent) * 0.5 * self.height - 0.5
    return row, col

  def _center(self, track_pos, xp):
    c = xp.asarray(self.center, dtype=xp.float32)
    if self.track and track_pos is not None:
      for a in self.track:
        c = c.at[a].set(track_pos[a]) if xp is jnp else np.where(np.arange(3) == a, track_pos[a], c)
    return c


@dataclasses.dataclass(frozen=True)
class Primitive:
  """An extra shape drawn at a position given per call (axis-aligned; capsule axis = world z).

  size: sphere (radius,), capsule (radius, half_length), box (hx, hy, hz).
  """

  kind: str
  size: tuple[float, ...]
  rgb: tuple[float, float, float]


def _quat_to_mat(q):
  """Unit quaternions (w, x, y, z) [..., 4] -> rotation matrices [..., 3, 3] (columns = local axes)."""
  w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
  return jnp.stack([
      jnp.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
      jnp.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
      jnp.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
  ], -2)


def _vec_mat(v, m):
  """v @ m for [..., 3] x [..., 3, 3] without dot ops (tiny contractions are slow as XLA-CPU dots)."""
  return v[..., 0:1] * m[..., 0, :] + v[..., 1:2] * m[..., 1, :] + v[..., 2:3] * m[..., 2, :]


def _mat_vec(m, v):
  """m @ v for [..., 3, 3] x [..., 3]."""
  return m[..., :, 0] * v[..., 0:1] + m[..., :, 1] * v[..., 1:2] + m[..., :, 2] * v[..., 2:3]


def _hit_sphere(o, d, r):
  """o [G,P,3] local ray origins, d [G,1,3] unit local directions, r [G,1] -> t [G,P], n [G,P,3]."""
  b = jnp.sum(o * d, -1)
  c = jnp.sum(o * o, -1) - r * r
  disc = b * b - c
  t = -b - jnp.sqrt(jnp.maximum(disc, 0.0))
  t = jnp.where((disc > 0) & (t > 0), t, _BIG)
  n = (o + t[..., None] * d) / r[..., None]
  return t, n


def _hit_capsule(o, d, r, h):
  """Capsule along local z with radius r [G,1] and half-length h [G,1]."""
  a = d[..., 0] ** 2 + d[..., 1] ** 2
  b = o[..., 0] * d[..., 0] + o[..., 1] * d[..., 1]
  c = o[..., 0] ** 2 + o[..., 1] ** 2 - r * r
  disc = b * b - a * c
  safe_a = jnp.where(a > 1e-9, a, 1.0)
  t_cyl = (-b - jnp.sqrt(jnp.maximum(disc, 0.0))) / safe_a
  z = o[..., 2] + t_cyl * d[..., 2]
  t_cyl = jnp.where((a > 1e-9) & (disc > 0) & (t_cyl > 0) & (jnp.abs(z) <= h), t_cyl, _BIG)
  p_cyl = o + t_cyl[..., None] * d
  n_cyl = p_cyl * jnp.array([1.0, 1.0, 0.0]) / r[..., None]
  off = jnp.stack([jnp.zeros_like(h), jnp.zeros_like(h), h], -1)  # [G,1,3]
  t_top, n_top = _hit_sphere(o - off, d, r)
  t_bot, n_bot = _hit_sphere(o + off, d, r)
  t = jnp.minimum(t_cyl, jnp.minimum(t_top, t_bot))
  n = jnp.where((t == t_cyl)[..., None], n_cyl, jnp.where((t == t_top)[..., None], n_top, n_bot))
  return t, n


def _hit_box(o, d, half):
  """Box with half sizes half [G,1,3]."""
  safe_d = jnp.where(jnp.abs(d) < 1e-9, 1e-9, d)
  inv = 1.0 / safe_d
  t1 = (-half - o) * inv
  t2 = (half - o) * inv
  tnear = jnp.minimum(t1, t2)
  tfar = jnp.maximum(t1, t2)
  t_enter = jnp.max(tnear, -1)
  t_exit = jnp.min(tfar, -1)
  t = jnp.where((t_exit >= t_enter) & (t_enter > 0), t_enter, _BIG)
  axis = jnp.argmax(tnear, -1)
  n = jax.nn.one_hot(axis, 3) * -jnp.sign(safe_d)
  return t, n


def _hit_plane(o, d, half):
  """Plane z=0 (normal +z) bounded by |x|<=hx, |y|<=hy when those are > 0. Returns t, n, local hit."""
  dz = d[..., 2]
  safe = jnp.where(jnp.abs(dz) < 1e-9, 1e-9, dz)
  t = -o[..., 2] / safe
  p = o + t[..., None] * d
  inside = ((half[..., 0] <= 0) | (jnp.abs(p[..., 0]) <= half[..., 0])) & \
           ((half[..., 1] <= 0) | (jnp.abs(p[..., 1]) <= half[..., 1]))
  t = jnp.where((jnp.abs(dz) > 1e-9) & (t > 0) & inside, t, _BIG)
  n = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), p.shape) * jnp.sign(-safe)[..., None]
  return t, n, p


class BraxRenderer:
  """Renders one pipeline state (x.pos [L,3], x.rot [L,4]) into a uint8 [H, W, 3] image.

  Args:
    sys: the brax System (its geom_* arrays are read once, on the host).
    camera: the fixed camera.
    colors: {geom index: rgb in [0,1]} overrides of the model's rgba (targets drawn in colour).
    extras: shapes whose positions are passed per call as `extra_pos` [len(extras), 3].
    checker: size of the checkerboard cells drawn on planes (0 = flat).
    background: rgb of pixels hitting nothing.
    skip_geoms: geom indices not to draw.
    sizes: {geom index: size} overrides of the drawn size (e.g. a tiny target drawn at its success radius).
  """

  def __init__(self, sys, camera: Camera, colors: dict[int, Sequence[float]] | None = None,
               extras: Sequence[Primitive] = (), checker: float = 0.0,
               background: Sequence[float] = (0.55, 0.7, 0.85), skip_geoms: Sequence[int] = (),
               sizes: dict[int, Sequence[float]] | None = None):
    self.camera = camera
    self.checker = float(checker)
    self.background = np.asarray(background, np.float32)
    types = np.asarray(sys.geom_type)
    sizes_arg = sizes
    sizes = np.array(sys.geom_size, np.float32)
    for g, sz in dict(sizes_arg or {}).items():
      sizes[g, : len(sz)] = sz
    pos = np.asarray(sys.geom_pos, np.float32)
    quat = np.asarray(sys.geom_quat, np.float32)
    body = np.asarray(sys.geom_bodyid)
    rgba = np.asarray(sys.geom_rgba, np.float32)
    colors = dict(colors or {})
    groups: dict[int, list] = {k: [] for k in _KIND_NAMES}
    for g in range(len(types)):
      if g in skip_geoms or rgba[g, 3] <= 0.0:
        continue
      if int(types[g]) not in _KIND_NAMES:
        raise ValueError(f"BraxRenderer: geom {g} has unsupported type {int(types[g])}; supported: "
                         f"{sorted(_KIND_NAMES.values())}")
      rgb = np.asarray(colors.get(g, rgba[g, :3]), np.float32)
      groups[int(types[g])].append((sizes[g], pos[g], quat[g], int(body[g]), rgb, -1))
    kind_ids = {"sphere": SPHERE, "capsule": CAPSULE, "box": BOX}
    for i, e in enumerate(extras):
      if e.kind not in kind_ids:
        raise ValueError(f"BraxRenderer: extra primitive {i} has kind {e.kind!r}; expected one of {list(kind_ids)}")
      size = np.zeros(3, np.float32)
      size[: len(e.size)] = e.size
      groups[kind_ids[e.kind]].append((size, np.zeros(3, np.float32), np.array([1, 0, 0, 0], np.float32), 0,
                                       np.asarray(e.rgb, np.float32), i))
    self.num_extras = len(extras)
    # Geoms fixed in the world (body 0, not extras) are ray-cast once, at construction, when the
    # camera does not move; per frame only the moving geoms are cast and composited by depth.
    pre_render = not camera.track
    def stack(items):
      out = {}
      for k in _KIND_NAMES:
        its = [it for it in items if (it[6] if len(it) > 6 else None) == k]
        if its:
          out[k] = dict(
              size=np.stack([it[0] for it in its]), pos=np.stack([it[1] for it in its]),
              quat=np.stack([it[2] for it in its]), body=np.array([it[3] for it in its]),
              rgb=np.stack([it[4] for it in its]), extra=np.array([it[5] for it in its]))
      return out
    tagged = [(*it, k) for k, items in groups.items() for it in items]
    is_static = lambda it: pre_render and it[3] == 0 and it[5] < 0
    self._groups = stack([it for it in tagged if not is_static(it)])
    static_groups = stack([it for it in tagged if is_static(it)])
    f, u, r = camera.basis()
    self._f, self._u, self._r = f, u, r
    h, w = camera.height, camera.width
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    sx = ((jj + 0.5) / w * 2 - 1) * camera.half_extent
    sy = (1 - (ii + 0.5) / h * 2) * camera.half_extent
    self._offsets = (sx[..., None] * r + sy[..., None] * u).reshape(-1, 3).astype(np.float32)  # [P,3]
    self._light = (-f + 0.6 * u + 0.3 * r) / np.linalg.norm(-f + 0.6 * u + 0.3 * r)
    self._static = None
    if static_groups:
      none = jnp.zeros((1, 3)), jnp.array([[1.0, 0, 0, 0]])
      t, rgb = jax.jit(lambda: self._cast(static_groups, *none, None, None))()
      self._static = (np.asarray(t), np.asarray(rgb))

  def _poses(self, grp, x_pos, x_rot, extra_pos):
    """World position [G,3] and rotation matrix [G,3,3] of every geom of a group."""
    body = grp["body"]
    link = np.maximum(body - 1, 0)
    bpos = jnp.where((body > 0)[:, None], x_pos[link], 0.0)
    brot = _quat_to_mat(jnp.where((body > 0)[:, None], x_rot[link], jnp.array([1.0, 0, 0, 0])))
    gpos = bpos + _mat_vec(brot, jnp.asarray(grp["pos"]))
    gq = _quat_to_mat(jnp.asarray(grp["quat"]))
    grot = jnp.stack([_mat_vec(brot, gq[:, :, k]) for k in range(3)], -1)
    if extra_pos is not None and (grp["extra"] >= 0).any():
      ex = grp["extra"]
      gpos = jnp.where((ex >= 0)[:, None], extra_pos[np.maximum(ex, 0)], gpos)
    return gpos, grot

  def __call__(self, x_pos, x_rot, extra_pos=None, track_pos=None):
    """Renders one state. x_pos [L,3], x_rot [L,4] (w,x,y,z); extra_pos [E,3]; track_pos [3].

    Two passes: hit distances of every (moving geom, pixel) pair, then normal, colour and checker
    only for the nearest geom of each pixel; composited by depth over the pre-rendered static geoms.
    """
    if self.num_extras and extra_pos is None:
      raise ValueError(f"BraxRenderer: {self.num_extras} extra primitives need extra_pos of shape "
                       f"[{self.num_extras}, 3]")
    t, rgb = self._cast(self._groups, x_pos, x_rot, extra_pos, track_pos)
    if self._static is not None:
      t_s, rgb_s = self._static
      rgb = jnp.where((t < t_s)[:, None], rgb, jnp.asarray(rgb_s))
    cam = self.camera
    img = jnp.clip(rgb * 255.0 + 0.5, 0, 255).astype(jnp.uint8)
    return img.reshape(cam.height, cam.width, 3)

  def _cast(self, groups, x_pos, x_rot, extra_pos, track_pos):
    """Per pixel: distance to the nearest geom of `groups` (_BIG if none) and its shaded rgb [P,3]."""
    cam = self.camera
    center = cam._center(track_pos, jnp)
    origins = center - 10.0 * jnp.asarray(self._f) + jnp.asarray(self._offsets)  # [P,3]
    fwd = jnp.asarray(self._f)
    ts, poss, rots, sizes, kinds, rgbs = [], [], [], [], [], []
    for kind, grp in groups.items():
      gpos, grot = self._poses(grp, x_pos, x_rot, extra_pos)
      o = _vec_mat(origins[None] - gpos[:, None], grot[:, None])  # local origins [G,P,3]
      d = _vec_mat(fwd, grot)[:, None]  # [G,1,3]
      size = jnp.asarray(grp["size"])
      if kind == SPHERE:
        t, _ = _hit_sphere(o, d, size[:, :1])
      elif kind == CAPSULE:
        t, _ = _hit_capsule(o, d, size[:, :1], size[:, 1:2])
      elif kind == BOX:
        t, _ = _hit_box(o, d, size[:, None, :])
      else:
        t, _, _ = _hit_plane(o, d, size[:, None, :])
      ts.append(t)
      poss.append(gpos)
      rots.append(grot)
      sizes.append(size)
      kinds.append(np.full(len(grp["size"]), kind))
      rgbs.append(grp["rgb"])
    if not ts:
      return jnp.full(origins.shape[:1], _BIG), jnp.broadcast_to(jnp.asarray(self.background), origins.shape)
    t_all = jnp.concatenate(ts)  # [G,P]
    idx = jnp.argmin(t_all, 0)  # [P]
    t = jnp.min(t_all, 0)
    hit = t < _BIG * 0.5
    # Second pass: per pixel, the winning geom only.
    gpos = jnp.concatenate(poss)[idx]  # [P,3]
    grot = jnp.concatenate(rots)[idx]  # [P,3,3]
    size = jnp.concatenate(sizes)[idx]  # [P,3]
    kind = jnp.asarray(np.concatenate(kinds))[idx]
    rgb = jnp.asarray(np.concatenate(rgbs))[idx]
    t = jnp.where(hit, t, 0.0)
    p_world = origins + t[:, None] * fwd
    p = _vec_mat(p_world - gpos, grot)  # local hit points
    n_sphere = p
    n_capsule = p - jnp.stack([jnp.zeros_like(p[:, 0]), jnp.zeros_like(p[:, 0]),
                               jnp.clip(p[:, 2], -size[:, 1], size[:, 1])], -1)
    rel = jnp.abs(p) / jnp.maximum(size, 1e-6)
    n_box = jax.nn.one_hot(jnp.argmax(rel, -1), 3) * jnp.sign(p)
    n_plane = jnp.broadcast_to(jnp.array([0.0, 0.0, 1.0]), p.shape)
    n = jnp.where((kind == SPHERE)[:, None], n_sphere,
                  jnp.where((kind == CAPSULE)[:, None], n_capsule,
                            jnp.where((kind == BOX)[:, None], n_box, n_plane)))
    n = _mat_vec(grot, n)
    n = n / (jnp.linalg.norm(n, axis=-1, keepdims=True) + 1e-9)
    lam = jnp.abs(jnp.sum(n * jnp.asarray(self._light), -1))
    shade = 0.45 + 0.55 * lam
    if self.checker > 0:
      parity = (jnp.floor(p[:, 0] / self.checker) + jnp.floor(p[:, 1] / self.checker)) % 2
      shade = shade * jnp.where(kind == PLANE, 1.0 - 0.18 * parity, 1.0)
    return jnp.where(hit, t, _BIG), jnp.where(hit[:, None], rgb * shade[:, None], jnp.asarray(self.background))
