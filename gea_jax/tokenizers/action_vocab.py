"""The action vocabulary: where action codes live among the LLM's token ids.

Layout of the reserved, contiguous block ``[first_id, first_id + num_ids)``:

* continuous embodiments share the RVQ codes: level ``l``, code ``c`` -> ``first_id + l * K + c``
  (each level has its own ``K`` ids, so the policy always knows which codebook it is emitting);
* each discrete embodiment then gets its own ids, one per named action, in spec order.

A chunk of ``H`` actions is ``H * L`` tokens for a continuous embodiment (ordered chunk step major,
level minor) and ``H`` tokens for a discrete one. Mixed batches use ``T = max tokens_per_action``
positions; positions an embodiment does not use hold ``PAD_ID`` (-1) in ``encode`` output, are
ignored by ``decode`` and admit no id in the validity mask.

Mode ``"extend"`` appends the block after the LLM's vocabulary (the model's embedding grows to
``total_vocab_size``); ``"reuse_tail"`` takes the last ``num_ids`` ids of the existing vocabulary
(as LEO does), leaving the model's vocabulary size unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gea_jax.envs.spec import EmbodimentSpec
from gea_jax.tokenizers.rvq import ActionTokenizer, max_action_dim

PAD_ID = -1
MODES = ("extend", "reuse_tail")


@dataclasses.dataclass(frozen=True)
class VocabLayout:
  """Pure metadata of the mapping (JSON round trip); no arrays, no networks."""

  specs: tuple[EmbodimentSpec, ...]
  num_levels: int
  codebook_size: int
  chunk_len: int
  llm_vocab_size: int
  mode: Literal["extend", "reuse_tail"] = "extend"

  def __post_init__(self):
    if not self.specs:
      raise ValueError("VocabLayout.specs: needs at least one embodiment")
    names = [s.name for s in self.specs]
    if len(set(names)) != len(names):
      raise ValueError(f"VocabLayout.specs: embodiment names must be unique, got {names}")
    for key in ("num_levels", "codebook_size", "chunk_len", "llm_vocab_size"):
      v = getattr(self, key)
      if not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"VocabLayout.{key}: must be an integer > 0, got {v!r}")
    if self.mode not in MODES:
      raise ValueError(f"VocabLayout.mode: must be one of {MODES}, got {self.mode!r}")
    if self.mode == "reuse_tail" and self.num_ids > self.llm_vocab_size:
      raise ValueError(f"VocabLayout.mode: 'reuse_tail' needs {self.num_ids} ids but the LLM vocabulary "
                       f"has only {self.llm_vocab_size}")

  @property
  def has_continuous(self) -> bool:
    return any(s.action_space.is_continuous for s in self.specs)

  @property
  def num_code_ids(self) -> int:
    return self.num_levels * self.codebook_size if self.has_continuous else 0

  @property
  def num_ids(self) -> int:
    """Size of the reserved block."""
    return self.num_code_ids + sum(s.action_space.num_actions for s in self.specs
                                   if not s.action_space.is_continuous)

  @property
  def first_id(self) -> int:
    return self.llm_vocab_size if self.mode == "extend" else self.llm_vocab_size - self.num_ids

  @property
  def total_vocab_size(self) -> int:
    """Vocabulary size the LLM must have (its embedding and logits) for these ids to exist."""
    return self.llm_vocab_size + self.num_ids if self.mode == "extend" else self.llm_vocab_size

  def to_json(self) -> dict[str, Any]:
    return {"specs": [s.to_json() for s in self.specs], "num_levels": self.num_levels,
            "codebook_size": self.codebook_size, "chunk_len": self.chunk_len,
            "llm_vocab_size": self.llm_vocab_size, "mode": self.mode,
            # derived, for readers of the JSON (checked on load)
            "first_id": self.first_id, "num_ids": self.num_ids}

  @classmethod
  def from_json(cls, d: Mapping[str, Any]) -> "VocabLayout":
    out = cls(specs=tuple(EmbodimentSpec.from_json(s) for s in d["specs"]), num_levels=int(d["num_levels"]),
              codebook_size=int(d["codebook_size"]), chunk_len=int(d["chunk_len"]),
              llm_vocab_size=int(d["llm_vocab_size"]), mode=d["mode"])
    for k in ("first_id", "num_ids"):
      if k in d and int(d[k]) != getattr(out, k):
        raise ValueError(f"vocab mapping: stored {k}={d[k]} disagrees with the layout ({getattr(out, k)})")
    return out


def _is_concrete(*xs) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in xs)


class ActionVocab:
  """Encode actions to LLM token ids and back, for one or many embodiments in a batch.

  ``embodiment`` arguments are a name, an index (into ``layout.specs``) or an int array ``[b]`` of
  indices. ``encode``/``decode`` are jittable: called inside a traced function they trace through
  (the tokenizer's arrays become constants of that program; no checks possible, out-of-block ids are
  clamped). Called on concrete arrays they validate their input (``ValueError`` naming the row,
  position and embodiment) and run a cached ``nnx.jit`` program that takes the tokenizer as an
  argument, so later updates of the tokenizer's state are seen.
  """

  def __init__(self, layout: VocabLayout, tokenizer: ActionTokenizer | None = None):
    if layout.has_continuous:
      if tokenizer is None:
        raise ValueError("ActionVocab: a tokenizer is required when any embodiment is continuous")
      if tuple(tokenizer.names) != tuple(s.name for s in layout.specs):
        raise ValueError(f"ActionVocab: tokenizer embodiments {list(tokenizer.names)} differ from the "
                         f"layout's {[s.name for s in layout.specs]}")
      c = tokenizer.cfg
      if (c.num_levels, c.codebook_size, c.chunk_len) != (layout.num_levels, layout.codebook_size,
                                                          layout.chunk_len):
        raise ValueError("ActionVocab: tokenizer (num_levels, codebook_size, chunk_len) = "
                         f"{(c.num_levels, c.codebook_size, c.chunk_len)} differ from the layout's "
                         f"{(layout.num_levels, layout.codebook_size, layout.chunk_len)}")
    self.layout = layout
    self.tokenizer = tokenizer
    self.specs = layout.specs
    self.names = tuple(s.name for s in layout.specs)
    self.max_dim = max_action_dim(layout.specs)
    self.chunk_len = layout.chunk_len
    lay = layout
    self._discrete_offset = {}
    off = lay.first_id + lay.num_code_ids
    for i, s in enumerate(lay.specs):
      if not s.action_space.is_continuous:
        self._discrete_offset[i] = off
        off += s.action_space.num_actions
    self.max_tokens = max(self.tokens_per_action(i) for i in range(len(lay.specs)))
    e = len(lay.specs)
    # per embodiment: [lo, hi) of valid ids at each position (hi == lo: unused position)
    lo = np.zeros((e, self.max_tokens), np.int32)
    hi = np.zeros((e, self.max_tokens), np.int32)
    for i, s in enumerate(lay.specs):
      for p in range(self.tokens_per_action(i)):
        if s.action_space.is_continuous:
          lo[i, p] = lay.first_id + (p % lay.num_levels) * lay.codebook_size
          hi[i, p] = lo[i, p] + lay.codebook_size
        else:
          lo[i, p] = self._discrete_offset[i]
          hi[i, p] = lo[i, p] + s.action_space.num_actions
    self._lo, self._hi = lo, hi
    self._is_discrete = np.array([not s.action_space.is_continuous for s in lay.specs])
    disc_off = np.array([self._discrete_offset.get(i, 0) for i in range(e)], np.int32)
    disc_n = np.array([s.action_space.num_actions if not s.action_space.is_continuous else 1
                       for s in lay.specs], np.int32)
    self._disc_off, self._disc_n = disc_off, disc_n
    self._dims = np.array([s.action_space.dim if s.action_space.is_continuous else 1
                           for s in lay.specs], np.int32)

  # --- metadata ----------------------------------------------------------------------------------

  @property
  def first_id(self) -> int:
    return self.layout.first_id

  @property
  def num_ids(self) -> int:
    return self.layout.num_ids

  @property
  def total_vocab_size(self) -> int:
    return self.layout.total_vocab_size

  @property
  def num_embodiments(self) -> int:
    return len(self.specs)

  def embodiment_index(self, embodiment: int | str) -> int:
    if isinstance(embodiment, str):
      if embodiment not in self.names:
        raise ValueError(f"unknown embodiment {embodiment!r}; known: {list(self.names)}")
      return self.names.index(embodiment)
    if isinstance(embodiment, (bool, np.bool_)) or not isinstance(embodiment, (int, np.integer)):
      raise ValueError(f"embodiment must be a name or an int index, got {embodiment!r}")
    i = int(embodiment)
    if not 0 <= i < len(self.specs):
      raise ValueError(f"embodiment id {i} out of range [0, {len(self.specs)}); known: {list(self.names)}")
    return i

  def tokens_per_action(self, embodiment: int | str) -> int:
    """Tokens per chunk of ``chunk_len`` actions: L * H (continuous) or H (discrete)."""
    i = self.embodiment_index(embodiment)
    cont = self.specs[i].action_space.is_continuous
    return self.chunk_len * (self.layout.num_levels if cont else 1)

  def action_dim(self, embodiment: int | str) -> int:
    s = self.specs[self.embodiment_index(embodiment)].action_space
    return s.dim if s.is_continuous else 1

  def discrete_ids(self, embodiment: int | str) -> range:
    """Reserved ids of a discrete embodiment's actions (index order of its ``names``)."""
    i = self.embodiment_index(embodiment)
    if i not in self._discrete_offset:
      raise ValueError(f"embodiment {self.names[i]!r} is continuous: it has no discrete action ids")
    off = self._discrete_offset[i]
    return range(off, off + self.specs[i].action_space.num_actions)

  def id_range(self, embodiment: int | str, position: int) -> tuple[int, int]:
    """[lo, hi) of the ids valid for ``embodiment`` at token ``position`` (lo == hi: none)."""
    i = self.embodiment_index(embodiment)
    if not 0 <= position < self.max_tokens:
      raise ValueError(f"position {position} out of range [0, {self.max_tokens})")
    return int(self._lo[i, position]), int(self._hi[i, position])

  # --- masks -------------------------------------------------------------------------------------

  def valid_mask(self, embodiment: int | str, position: int) -> np.ndarray:
    """bool[total_vocab_size]: the ids the policy may emit for ``embodiment`` at ``position``."""
    lo, hi = self.id_range(embodiment, position)
    m = np.zeros((self.total_vocab_size,), np.bool_)
    m[lo:hi] = True
    return m

  @functools.cached_property
  def mask_table(self) -> jax.Array:
    """bool[num_embodiments, max_tokens, total_vocab_size] for use inside jit (``table[emb, pos]``)."""
    ids = np.arange(self.total_vocab_size)
    return jnp.asarray((ids >= self._lo[..., None]) & (ids < self._hi[..., None]))

  def token_mask(self, embodiment) -> jax.Array:
    """bool[b, max_tokens]: which positions each row's embodiment uses."""
    emb = self._emb_array(embodiment, None)
    return jnp.asarray(self._hi > self._lo)[emb]

  def action_mask(self, embodiment) -> jax.Array:
    """bool[b, max_dim]: which action dimensions each row's embodiment has."""
    emb = self._emb_array(embodiment, None)
    return jnp.arange(self.max_dim)[None] < jnp.asarray(self._dims)[emb][:, None]

  def cut(self, actions, embodiment: int | str):
    """Actions [..., H, max_dim] of one embodiment -> [..., H, dim] (its own dimension)."""
    return actions[..., : self.action_dim(embodiment)]

  def split(self, actions, embodiment_ids) -> list:
    """Per-row list of actions [H, dim_e] cut to each row's embodiment (host-side helper)."""
    actions = np.asarray(actions)
    emb = np.asarray(embodiment_ids).reshape(-1)
    return [actions[r, :, : self._dims[e]] for r, e in enumerate(emb)]

  # --- encode / decode ---------------------------------------------------------------------------

  def _emb_array(self, embodiment, batch: int | None):
    """Embodiment argument -> int32 [b] (numpy when concrete, validated; jnp under a trace)."""
    if isinstance(embodiment, (str, int, np.integer)) and not isinstance(embodiment, bool):
      i = self.embodiment_index(embodiment)
      return np.full((1 if batch is None else batch,), i, np.int32)
    concrete = _is_concrete(embodiment)
    emb = np.asarray(embodiment) if concrete else jnp.asarray(embodiment)
    if emb.ndim != 1 or not np.issubdtype(emb.dtype, np.integer):
      raise ValueError(f"embodiment ids must be an int array [b], got shape {emb.shape} dtype {emb.dtype}")
    if batch is not None and emb.shape[0] != batch:
      raise ValueError(f"embodiment ids have batch {emb.shape[0]} but the input has batch {batch}")
    if concrete:
      bad = emb[(emb < 0) | (emb >= len(self.specs))]
      if bad.size:
        raise ValueError(f"unknown embodiment id {int(bad[0])}: expected ids in [0, {len(self.specs)}) "
                         f"for {list(self.names)}")
    return emb.astype(np.int32) if concrete else emb.astype(jnp.int32)

  def _pad_actions(self, actions, embodiment):
    """Shape checks; pads the last axis to max_dim (numpy for concrete input, jnp under a trace)."""
    xp = np if _is_concrete(actions) else jnp
    a = xp.asarray(actions, dtype=xp.float32)
    h = self.chunk_len
    if a.ndim != 3 or a.shape[1] != h:
      raise ValueError(f"actions must have shape [batch, chunk_len={h}, action_dim], got {tuple(a.shape)}")
    d = a.shape[-1]
    if isinstance(embodiment, (str, int, np.integer)):
      want = self.action_dim(embodiment)
      if d not in (want, self.max_dim):
        raise ValueError(f"actions of embodiment {self.names[self.embodiment_index(embodiment)]!r} must have "
                         f"dimension {want} (or padded {self.max_dim}), got {d}")
    elif d != self.max_dim:
      raise ValueError(f"actions of a mixed batch must be zero-padded to the max action dimension "
                       f"{self.max_dim}, got {d}")
    if d < self.max_dim:
      a = xp.pad(a, ((0, 0), (0, 0), (0, self.max_dim - d)))
    return a

  def _encode_core(self, tok, a, emb):
    lay, h, t = self.layout, self.chunk_len, self.max_tokens
    b = a.shape[0]
    a = a * self.action_mask(emb)[:, None, :]
    out = jnp.full((b, t), PAD_ID, jnp.int32)
    if lay.has_continuous:
      codes = tok.encode(a, emb)  # [b, H, L]
      ids = lay.first_id + jnp.arange(lay.num_levels)[None, None] * lay.codebook_size + codes
      out = out.at[:, : h * lay.num_levels].set(ids.reshape(b, -1).astype(jnp.int32))
    if self._is_discrete.any():
      idx = jnp.round(a[:, :, 0]).astype(jnp.int32)  # [b, H]
      idx = jnp.clip(idx, 0, jnp.asarray(self._disc_n)[emb][:, None] - 1)
      dids = jnp.asarray(self._disc_off)[emb][:, None] + idx
      dtok = jnp.full((b, t), PAD_ID, jnp.int32).at[:, :h].set(dids)
      out = jnp.where(jnp.asarray(self._is_discrete)[emb][:, None], dtok, out)
    return out

  def _decode_core(self, tok, ids, emb):
    lay, h = self.layout, self.chunk_len
    b = ids.shape[0]
    out = jnp.zeros((b, h, self.max_dim), jnp.float32)
    if lay.has_continuous:
      n = h * lay.num_levels
      levels = (jnp.arange(n) % lay.num_levels)[None]
      codes = jnp.clip(ids[:, :n] - lay.first_id - levels * lay.codebook_size, 0, lay.codebook_size - 1)
      out = tok.decode(codes.reshape(b, h, lay.num_levels), emb)
    if self._is_discrete.any():
      idx = jnp.clip(ids[:, :h] - jnp.asarray(self._disc_off)[emb][:, None], 0,
                     jnp.asarray(self._disc_n)[emb][:, None] - 1)
      dact = jnp.zeros((b, h, self.max_dim), jnp.float32).at[:, :, 0].set(idx.astype(jnp.float32))
      out = jnp.where(jnp.asarray(self._is_discrete)[emb][:, None, None], dact, out)
    return out

  @functools.cached_property
  def _jitted(self):
    # the tokenizer is an argument (not a closure constant), so later updates of its state are seen
    return (nnx.jit(lambda tok, a, e: self._encode_core(tok, a, e)),
            nnx.jit(lambda tok, i, e: self._decode_core(tok, i, e)))

  def encode(self, actions, embodiment) -> jax.Array:
    """Actions [b, H, dim] (one embodiment) or [b, H, max_dim] (any) -> token ids [b, max_tokens].

    Continuous rows: the tokenizer's codes (raw actions, normalized inside). Discrete rows: the
    action index is ``actions[:, h, 0]``. Unused positions hold ``PAD_ID``. Outside jit, input is
    validated (ValueError) and the work runs in a cached jitted function.
    """
    b = jnp.shape(actions)[0]
    emb = self._emb_array(embodiment, b)
    a = self._pad_actions(actions, embodiment)
    if not _is_concrete(actions, embodiment):
      return self._encode_core(self.tokenizer, a, emb)
    emb_np = np.asarray(emb)
    if self._is_discrete.any():
      idx = np.round(a[:, :, 0]).astype(np.int64)
      n = self._disc_n[emb_np][:, None]
      bad = np.argwhere(self._is_discrete[emb_np][:, None] & ((idx < 0) | (idx >= n)))
      if bad.size:
        r = int(bad[0][0])
        raise ValueError(f"discrete action {int(idx[tuple(bad[0])])} of row {r} is out of range "
                         f"[0, {int(n[r, 0])}) for embodiment {self.names[int(emb_np[r])]!r}")
    return self._jitted[0](self.tokenizer, a, emb)

  def check_ids(self, ids, embodiment) -> None:
    """ValueError if any id at a used position lies outside the embodiment's reserved range there."""
    ids = np.asarray(ids)
    b = ids.shape[0]
    emb = np.asarray(self._emb_array(embodiment, b))
    lo, hi = self._lo[emb][:, : ids.shape[1]], self._hi[emb][:, : ids.shape[1]]
    bad = np.argwhere((hi > lo) & ((ids < lo) | (ids >= hi)))
    if bad.size:
      r, p = (int(x) for x in bad[0])
      raise ValueError(f"token id {int(ids[r, p])} at row {r}, position {p} is outside the reserved ids "
                       f"[{int(lo[r, p])}, {int(hi[r, p])}) of embodiment {self.names[int(emb[r])]!r}")

  def decode(self, ids, embodiment) -> jax.Array:
    """Token ids [b, max_tokens] (or [b, tokens_per_action] for one embodiment) -> actions [b, H, max_dim].

    Continuous rows are de-normalized and clipped to their bounds; discrete rows hold the action
    index (as a float) in ``[:, h, 0]``. Padded dimensions are 0. Outside jit, ids outside the
    reserved block raise ``ValueError``; inside jit they are clamped into it.
    """
    concrete = _is_concrete(ids, embodiment)
    xp = np if concrete else jnp
    ids = xp.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"token ids must be an int array [batch, tokens], got shape {ids.shape} dtype {ids.dtype}")
    b, t = ids.shape
    emb = self._emb_array(embodiment, b)
    need = self.tokens_per_action(embodiment) if isinstance(embodiment, (str, int, np.integer)) else self.max_tokens
    if t < need:
      raise ValueError(f"token ids have {t} positions, expected {need}")
    if t > self.max_tokens:
      raise ValueError(f"token ids have {t} positions, more than max_tokens={self.max_tokens}")
    ids = xp.pad(ids.astype(xp.int32), ((0, 0), (0, self.max_tokens - t)), constant_values=PAD_ID)
    if not concrete:
      return self._decode_core(self.tokenizer, ids, emb)
    self.check_ids(ids, emb)
    return self._jitted[1](self.tokenizer, ids, emb)


def build_vocab(tokenizer: ActionTokenizer | None, specs: Sequence[EmbodimentSpec] | None = None, *,
                llm_vocab_size: int, mode: str = "extend", num_levels: int | None = None,
                codebook_size: int | None = None, chunk_len: int | None = None) -> ActionVocab:
  """An ``ActionVocab`` over the tokenizer's embodiments (or ``specs`` when there is no tokenizer)."""
  if tokenizer is not None:
    c = tokenizer.cfg
    specs = tokenizer.specs if specs is None else tuple(specs)
    num_levels, codebook_size, chunk_len = c.num_levels, c.codebook_size, c.chunk_len
  if specs is None:
    raise ValueError("build_vocab: give a tokenizer or specs")
  layout = VocabLayout(specs=tuple(specs), num_levels=num_levels or 1, codebook_size=codebook_size or 1,
                       chunk_len=chunk_len or 1, llm_vocab_size=llm_vocab_size, mode=mode)
  return ActionVocab(layout, tokenizer)
