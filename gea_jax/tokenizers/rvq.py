"""Stage 0: the multi-embodiment residual-VQ action tokenizer (Flax NNX).

A chunk of ``H`` actions of any continuous embodiment is normalized with that embodiment's dataset
statistics, zero-padded to the largest action dimension (a mask keeps padded dimensions out of the
input and the loss), and encoded, together with a learned embodiment embedding, into ``H`` latent
vectors. Each latent is quantized by ``L`` residual codebooks of ``K`` entries, so a chunk becomes
``H * L`` integer codes. The decoder maps the summed code vectors (and the embodiment embedding) back
to the chunk, which is de-normalized, cut to the embodiment's dimension and clipped to its bounds.

Training: straight-through gradients for the networks, a commitment loss per level, and codebooks
updated by exponential moving averages (not by the optimizer) with dead-code restart: a code unused
for ``dead_code_threshold`` consecutive updates is re-seeded from the current inputs of its level.
The EMA statistics are plain sums over the (global) batch inside ``jit``, so under a mesh they are
summed across all devices and processes by the partitioner.

Everything the tokenizer needs at inference (networks, codebooks, normalization statistics and
bounds) is state of this module, so the artifact (``artifact.py``) restores it with nothing else.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gea_jax import sharding as _sharding  # noqa: F401  (turns eager sharding off)
from gea_jax.envs.spec import EmbodimentSpec

_HI = jax.lax.Precision.HIGHEST


class Codebook(nnx.Variable):
  """Codebook vectors and their EMA statistics: updated by ``ema_update``, never by the optimizer."""


class ActionStats(nnx.Variable):
  """Per-embodiment normalization statistics, bounds and dimension masks (constants after init)."""


@dataclasses.dataclass(frozen=True)
class RVQConfig:
  """Hyper-parameters of the residual VQ-VAE."""

  num_levels: int = 2  # L residual codebooks
  codebook_size: int = 512  # K entries per codebook
  latent_dim: int = 16  # D of each code vector
  hidden: int = 256  # width of the encoder / decoder MLPs
  num_layers: int = 2  # hidden layers in each MLP
  chunk_len: int = 1  # H actions per chunk
  embodiment_dim: int = 16  # learned embodiment embedding size
  commitment: float = 0.25  # weight of the commitment loss
  ema_decay: float = 0.99
  dead_code_threshold: int = 50  # updates without use before a code is re-seeded

  def __post_init__(self):
    validate_rvq_config(self)

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "RVQConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"rvq config: unknown keys {unknown}; expected a subset of {sorted(known)}")
    return cls(**dict(d))


def validate_rvq_config(cfg: Any, prefix: str = "rvq") -> None:
  """One-line ValueErrors naming the key (works on RVQConfig and on a ConfigDict section)."""
  get = (lambda k: getattr(cfg, k))
  for key in ("num_levels", "codebook_size", "latent_dim", "hidden", "num_layers", "chunk_len",
              "embodiment_dim", "dead_code_threshold"):
    v = get(key)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
      raise ValueError(f"{prefix}.{key}: must be an integer > 0, got {v!r}")
  c = get("commitment")
  if not isinstance(c, (int, float)) or isinstance(c, bool) or c < 0:
    raise ValueError(f"{prefix}.commitment: must be a number >= 0, got {c!r}")
  d = get("ema_decay")
  if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0.0 < d < 1.0:
    raise ValueError(f"{prefix}.ema_decay: must be in (0, 1), got {d!r}")


def max_action_dim(specs: Sequence[EmbodimentSpec]) -> int:
  """Largest continuous action dimension (1 if all embodiments are discrete)."""
  dims = [s.action_space.dim for s in specs if s.action_space.is_continuous]
  return max(dims) if dims else 1


def _dense(din: int, dout: int, names: tuple[str | None, str | None], rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(din, dout, rngs=rngs,
                    kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)))


class MLP(nnx.Module):
  """Linear -> SiLU stacks with a linear head (mirrored one to one by the PyTorch decoder)."""

  def __init__(self, din: int, hidden: int, dout: int, num_layers: int, *, rngs: nnx.Rngs):
    sizes = [din] + [hidden] * num_layers
    self.layers = nnx.List([_dense(a, b, (None, "mlp"), rngs) for a, b in zip(sizes[:-1], sizes[1:])])
    self.head = _dense(sizes[-1], dout, ("mlp", None), rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = jax.nn.silu(layer(x))
    return self.head(x)


def _stats_arrays(specs: Sequence[EmbodimentSpec], stats: Mapping[str, Any] | None, dmax: int):
  """[E, dmax] mean, std, low, high, mask and [E] is_discrete from the specs and dataset stats."""
  e = len(specs)
  mean = np.zeros((e, dmax), np.float32)
  std = np.ones((e, dmax), np.float32)
  low = np.zeros((e, dmax), np.float32)
  high = np.zeros((e, dmax), np.float32)
  mask = np.zeros((e, dmax), np.float32)
  discrete = np.zeros((e,), np.bool_)
  stats = dict(stats or {})
  unknown = sorted(set(stats) - {s.name for s in specs})
  if unknown:
    raise ValueError(f"normalization stats given for unknown embodiments {unknown}")
  for i, spec in enumerate(specs):
    space = spec.action_space
    if not space.is_continuous:
      discrete[i] = True
      continue
    d = space.dim
    low[i, :d], high[i, :d], mask[i, :d] = space.low, space.high, 1.0
    if spec.name in stats:
      st = stats[spec.name]
      m = np.asarray(st["mean"], np.float64).reshape(-1)
      s = np.asarray(st["std"], np.float64).reshape(-1)
      if m.shape != (d,) or s.shape != (d,):
        raise ValueError(f"normalization stats of {spec.name!r}: mean/std must have shape ({d},), "
                         f"got {m.shape} / {s.shape}")
      if not (np.all(np.isfinite(m)) and np.all(np.isfinite(s)) and np.all(s >= 0)):
        raise ValueError(f"normalization stats of {spec.name!r}: mean/std must be finite with std >= 0")
      mean[i, :d] = m
      std[i, :d] = np.where(s < 1e-6, 1.0, s)
    else:  # no dataset stats: map the box [low, high] to roughly [-1, 1]
      lo, hi = np.asarray(space.low), np.asarray(space.high)
      mean[i, :d] = (lo + hi) / 2
      std[i, :d] = (hi - lo) / 2
  return mean, std, low, high, mask, discrete


class ActionTokenizer(nnx.Module):
  """Residual VQ-VAE over action chunks of many embodiments.

  Embodiments are indexed by their position in ``specs`` (the same ids the vocabulary uses).
  Discrete embodiments get an (unused) embedding row and an all-zero dimension mask: their actions
  are tokenized by ``ActionVocab`` directly, one reserved id per action.
  """

  def __init__(self, cfg: RVQConfig, specs: Sequence[EmbodimentSpec],
               stats: Mapping[str, Mapping[str, Any]] | None = None, *, rngs: nnx.Rngs):
    if not specs:
      raise ValueError("ActionTokenizer needs at least one EmbodimentSpec")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
      raise ValueError(f"embodiment names must be unique, got {names}")
    self.cfg = cfg
    self.specs = tuple(specs)
    self.names = tuple(names)
    self.max_dim = max_action_dim(specs)
    h, dmax, dl = cfg.chunk_len, self.max_dim, cfg.latent_dim
    self.embed = nnx.Embed(len(specs), cfg.embodiment_dim, rngs=rngs,
                           embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0), (None, None)))
    self.encoder = MLP(h * dmax + cfg.embodiment_dim, cfg.hidden, h * dl, cfg.num_layers, rngs=rngs)
    self.decoder = MLP(h * dl + cfg.embodiment_dim, cfg.hidden, h * dmax, cfg.num_layers, rngs=rngs)
    nl, k = cfg.num_levels, cfg.codebook_size
    cb = jax.random.normal(rngs.params(), (nl, k, dl), jnp.float32)
    self.codebook = Codebook(cb, out_sharding=(None, "codebook", None))
    self.ema_count = Codebook(jnp.ones((nl, k), jnp.float32), out_sharding=(None, "codebook"))
    self.ema_sum = Codebook(cb, out_sharding=(None, "codebook", None))
    self.unused_steps = Codebook(jnp.zeros((nl, k), jnp.int32), out_sharding=(None, "codebook"))
    mean, std, low, high, mask, discrete = _stats_arrays(specs, stats, dmax)
    self.mean = ActionStats(jnp.asarray(mean), out_sharding=(None, None))
    self.std = ActionStats(jnp.asarray(std), out_sharding=(None, None))
    self.low = ActionStats(jnp.asarray(low), out_sharding=(None, None))
    self.high = ActionStats(jnp.asarray(high), out_sharding=(None, None))
    self.dim_mask = ActionStats(jnp.asarray(mask), out_sharding=(None, None))
    self.is_discrete = ActionStats(jnp.asarray(discrete), out_sharding=(None,))

  # --- metadata ----------------------------------------------------------------------------------

  def embodiment_index(self, embodiment: int | str) -> int:
    """Index of an embodiment given by name or index; ValueError naming the known ones otherwise."""
    if isinstance(embodiment, str):
      if embodiment not in self.names:
        raise ValueError(f"unknown embodiment {embodiment!r}; known: {list(self.names)}")
      return self.names.index(embodiment)
    i = int(embodiment)
    if not 0 <= i < len(self.specs):
      raise ValueError(f"embodiment id {i} out of range [0, {len(self.specs)}); known: {list(self.names)}")
    return i

  def metadata_json(self) -> dict[str, Any]:
    return {"rvq": self.cfg.to_json(), "specs": [s.to_json() for s in self.specs]}

  # --- normalization -----------------------------------------------------------------------------

  def normalize(self, actions: jax.Array, emb: jax.Array) -> jax.Array:
    """Raw padded actions [b, H, dmax] -> normalized, padded dimensions set to 0."""
    m = self.dim_mask[...][emb][:, None]
    return (actions - self.mean[...][emb][:, None]) / self.std[...][emb][:, None] * m

  def denormalize(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    """Normalized [b, H, dmax] -> raw actions clipped to the embodiment's bounds, padding 0."""
    a = x * self.std[...][emb][:, None] + self.mean[...][emb][:, None]
    a = jnp.clip(a, self.low[...][emb][:, None], self.high[...][emb][:, None])
    return a * self.dim_mask[...][emb][:, None]

  # --- networks ----------------------------------------------------------------------------------

  def encode_latent(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    """Normalized padded actions [b, H, dmax] -> latents [b, H, D]."""
    b, h = x.shape[0], self.cfg.chunk_len
    x = x * self.dim_mask[...][emb][:, None]
    inp = jnp.concatenate([x.reshape(b, -1), self.embed(emb)], axis=-1)
    return self.encoder(inp).reshape(b, h, self.cfg.latent_dim)

  def decode_latent(self, zq: jax.Array, emb: jax.Array) -> jax.Array:
    """Quantized latents [b, H, D] -> normalized actions [b, H, dmax] (padded dimensions 0)."""
    b, h = zq.shape[0], self.cfg.chunk_len
    out = self.decoder(jnp.concatenate([zq.reshape(b, -1), self.embed(emb)], axis=-1))
    return out.reshape(b, h, self.max_dim) * self.dim_mask[...][emb][:, None]

  def quantize(self, z: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Residual quantization of latents [..., D].

    Returns (zq [..., D] the sum of the chosen code vectors, codes [..., L] int32,
    level_inputs [..., L, D] the residual each level quantized).
    """
    cb = self.codebook[...]
    r = z
    codes, inputs = [], []
    for level in range(self.cfg.num_levels):
      c = cb[level]
      d = (jnp.sum(r * r, -1, keepdims=True) - 2 * jnp.einsum("...d,kd->...k", r, c, precision=_HI)
           + jnp.sum(c * c, -1))
      idx = jnp.argmin(d, axis=-1).astype(jnp.int32)
      inputs.append(r)
      codes.append(idx)
      r = r - c[idx]
    return z - r, jnp.stack(codes, -1), jnp.stack(inputs, -2)

  def lookup(self, codes: jax.Array) -> jax.Array:
    """Codes [..., L] -> summed code vectors [..., D]."""
    cb = self.codebook[...]
    return sum(cb[level][codes[..., level]] for level in range(self.cfg.num_levels))

  # --- public encode / decode (raw actions <-> codes) ---------------------------------------------

  def encode(self, actions: jax.Array, emb: jax.Array) -> jax.Array:
    """Raw padded actions [b, H, dmax] and embodiment ids [b] -> codes [b, H, L]."""
    z = self.encode_latent(self.normalize(actions, emb), emb)
    return self.quantize(z)[1]

  def decode(self, codes: jax.Array, emb: jax.Array) -> jax.Array:
    """Codes [b, H, L] and embodiment ids [b] -> raw actions [b, H, dmax], clipped, padding 0."""
    return self.denormalize(self.decode_latent(self.lookup(codes), emb), emb)

  # --- training ----------------------------------------------------------------------------------

  def __call__(self, actions: jax.Array, emb: jax.Array, weight: jax.Array | None = None) -> dict[str, jax.Array]:
    """Training forward on raw padded actions [b, H, dmax].

    ``weight`` [b] (default 1) drops rows (e.g. discrete embodiments) from losses and statistics.
    Returns the total ``loss``, its parts, per-row normalized squared error ``row_se`` and
    dimension count ``row_n``, and ``codes`` / ``level_inputs`` for ``ema_update``.
    """
    b = actions.shape[0]
    w = jnp.ones((b,), jnp.float32) if weight is None else weight.astype(jnp.float32)
    w = w * (1.0 - self.is_discrete[...][emb].astype(jnp.float32))
    x = self.normalize(actions, emb)
    z = self.encode_latent(x, emb)
    zq, codes, inputs = self.quantize(jax.lax.stop_gradient(z))
    # level inputs with gradients: r_l = z - sum_{j<l} q_j
    q_levels = inputs - jnp.concatenate([inputs[..., 1:, :], (z - zq)[..., None, :]], axis=-2)
    q_levels = jax.lax.stop_gradient(q_levels)  # the code vector chosen at each level
    prefix = jnp.cumsum(q_levels, axis=-2) - q_levels
    r_grad = z[..., None, :] - prefix
    zq_st = z + jax.lax.stop_gradient(zq - z)
    x_hat = self.decode_latent(zq_st, emb)
    m = self.dim_mask[...][emb][:, None] * jnp.ones_like(x)
    row_se = jnp.sum((x_hat - x) ** 2 * m, axis=(1, 2))
    row_n = jnp.sum(m, axis=(1, 2))
    recon = jnp.sum(row_se * w) / jnp.maximum(jnp.sum(row_n * w), 1.0)
    commit_rows = jnp.mean(jnp.sum((r_grad - q_levels) ** 2, -1), axis=(1, 2))
    commit = jnp.sum(commit_rows * w) / jnp.maximum(jnp.sum(w), 1.0)
    loss = recon + self.cfg.commitment * commit
    return {"loss": loss, "recon": recon, "commit": commit, "row_se": row_se, "row_n": row_n,
            "weight": w, "codes": codes, "level_inputs": jax.lax.stop_gradient(inputs)}

  def _sample_inputs(self, key: jax.Array, flat: jax.Array, w: jax.Array, n: int) -> jax.Array:
    """``n`` rows of ``flat`` [N, D] drawn with probability proportional to ``w`` [N]."""
    cdf = jnp.cumsum(jnp.maximum(w, 0.0))
    u = jax.random.uniform(key, (n,), maxval=1.0) * cdf[-1]
    idx = jnp.clip(jnp.searchsorted(cdf, u, side="right"), 0, flat.shape[0] - 1)
    return flat[idx]

  def ema_update(self, codes: jax.Array, level_inputs: jax.Array, weight: jax.Array, key: jax.Array
                 ) -> dict[str, jax.Array]:
    """EMA codebook update with dead-code restart from a forward's ``codes`` / ``level_inputs``.

    codes [b, H, L], level_inputs [b, H, L, D], weight [b]. Returns per-level batch statistics
    (``counts`` [L, K], ``perplexity`` [L], ``usage`` [L], ``restarted`` [L]).
    """
    cfg = self.cfg
    nl, k, dl = cfg.num_levels, cfg.codebook_size, cfg.latent_dim
    codes = codes.reshape(-1, nl)
    inputs = level_inputs.reshape(-1, nl, dl)
    w = jnp.repeat(weight.astype(jnp.float32), cfg.chunk_len)
    onehot = jax.nn.one_hot(codes, k, dtype=jnp.float32) * w[:, None, None]  # [N, L, K]
    counts = jnp.sum(onehot, axis=0)  # global sums: under a mesh the partitioner reduces across devices
    sums = jnp.einsum("nlk,nld->lkd", onehot, inputs, precision=_HI)
    decay = cfg.ema_decay
    ema_count = decay * self.ema_count[...] + (1 - decay) * counts
    ema_sum = decay * self.ema_sum[...] + (1 - decay) * sums
    total = jnp.sum(ema_count, -1, keepdims=True)
    eps = 1e-5
    smoothed = (ema_count + eps) / (total + k * eps) * total
    codebook = ema_sum / smoothed[..., None]
    unused = jnp.where(counts > 0, 0, self.unused_steps[...] + 1)
    dead = unused >= cfg.dead_code_threshold
    keys = jax.random.split(key, nl)
    seeds = jnp.stack([self._sample_inputs(keys[i], inputs[:, i], w, k) for i in range(nl)])  # [L, K, D]
    codebook = jnp.where(dead[..., None], seeds, codebook)
    mean_count = jnp.mean(ema_count, -1, keepdims=True)
    ema_count = jnp.where(dead, mean_count, ema_count)
    ema_sum = jnp.where(dead[..., None], seeds * mean_count[..., None], ema_sum)
    unused = jnp.where(dead, 0, unused)
    self.codebook[...] = codebook
    self.ema_count[...] = ema_count
    self.ema_sum[...] = ema_sum
    self.unused_steps[...] = unused
    p = counts / jnp.maximum(jnp.sum(counts, -1, keepdims=True), 1e-9)
    perplexity = jnp.exp(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), -1))
    return {"counts": counts, "perplexity": perplexity, "usage": jnp.mean(counts > 0, -1),
            "restarted": jnp.sum(dead, -1)}

  def init_codebooks(self, actions: jax.Array, emb: jax.Array, key: jax.Array,
                     weight: jax.Array | None = None) -> None:
    """Seed every level's codebook from random inputs of that level (level by level)."""
    cfg = self.cfg
    b = actions.shape[0]
    w = jnp.ones((b,), jnp.float32) if weight is None else weight.astype(jnp.float32)
    w = w * (1.0 - self.is_discrete[...][emb].astype(jnp.float32))
    z = self.encode_latent(self.normalize(actions, emb), emb).reshape(-1, cfg.latent_dim)
    wf = jnp.repeat(w, cfg.chunk_len)
    cb = self.codebook[...]
    r = z
    for level, k in enumerate(jax.random.split(key, cfg.num_levels)):
      seeds = self._sample_inputs(k, r, wf, cfg.codebook_size)
      cb = cb.at[level].set(seeds)
      d = (jnp.sum(r * r, -1, keepdims=True) - 2 * jnp.einsum("nd,kd->nk", r, seeds, precision=_HI)
           + jnp.sum(seeds * seeds, -1))
      r = r - seeds[jnp.argmin(d, -1)]
    self.codebook[...] = cb
    self.ema_sum[...] = cb
    self.ema_count[...] = jnp.ones_like(self.ema_count[...])
    self.unused_steps[...] = jnp.zeros_like(self.unused_steps[...])


def pad_actions(actions: np.ndarray, dmax: int) -> np.ndarray:
  """Zero-pad the last axis of ``actions`` to ``dmax``."""
  d = actions.shape[-1]
  if d > dmax:
    raise ValueError(f"actions have dimension {d} > the tokenizer's max action dimension {dmax}")
  pad = [(0, 0)] * (actions.ndim - 1) + [(0, dmax - d)]
  return np.pad(actions, pad) if d < dmax else actions

