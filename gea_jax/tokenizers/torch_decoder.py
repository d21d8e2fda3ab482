"""PyTorch decoder of the RVQ action tokenizer: token ids -> actions, for the exported agent.

Mirrors ``ActionVocab.decode`` + ``ActionTokenizer.decode`` one to one (same layer order, SiLU,
codebook sums, de-normalization, clipping), so it matches JAX within 1e-5. Its ``state_dict`` holds
everything it needs (codebooks, decoder, embodiment embedding, statistics, id layout buffers); the
layout and specs are kept as plain attributes for ``agent.json``.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from torch import nn

from gea_jax.envs.spec import EmbodimentSpec


class TorchRVQDecoder(nn.Module):
  """Decodes token ids [b, T] of embodiments [b] to actions [b, H, max_dim] (float32)."""

  def __init__(self, *, specs: Sequence[EmbodimentSpec], num_levels: int, codebook_size: int, chunk_len: int,
               latent_dim: int, hidden: int, num_layers: int, embodiment_dim: int, first_id: int,
               max_tokens: int):
    super().__init__()
    self.specs = tuple(specs)
    self.names = tuple(s.name for s in specs)
    self.num_levels, self.codebook_size, self.chunk_len = num_levels, codebook_size, chunk_len
    self.latent_dim, self.first_id, self.max_tokens = latent_dim, first_id, max_tokens
    dims = [s.action_space.dim for s in specs if s.action_space.is_continuous]
    self.has_continuous = bool(dims)
    self.max_dim = max(dims) if dims else 1
    e = len(specs)
    self.embed = nn.Embedding(e, embodiment_dim)
    sizes = [chunk_len * latent_dim + embodiment_dim] + [hidden] * num_layers
    self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])
    self.head = nn.Linear(sizes[-1], chunk_len * self.max_dim)
    self.register_buffer("codebook", torch.zeros(num_levels, codebook_size, latent_dim))
    for name in ("mean", "std", "low", "high", "dim_mask"):
      self.register_buffer(name, torch.zeros(e, self.max_dim))
    self.register_buffer("is_discrete", torch.zeros(e, dtype=torch.bool))
    self.register_buffer("id_lo", torch.zeros(e, max_tokens, dtype=torch.long))
    self.register_buffer("id_hi", torch.zeros(e, max_tokens, dtype=torch.long))
    self.register_buffer("disc_off", torch.zeros(e, dtype=torch.long))

  @classmethod
  def from_artifact(cls, path: str | os.PathLike) -> "TorchRVQDecoder":
    """Build from an RVQ artifact directory (reads it with ``load_artifact``)."""
    from gea_jax.tokenizers.artifact import load_artifact
    tokenizer, vocab = load_artifact(path)
    return cls.from_jax(tokenizer, vocab)

  @classmethod
  def from_jax(cls, tokenizer, vocab) -> "TorchRVQDecoder":
    """Copy a JAX ``ActionTokenizer`` + ``ActionVocab`` into a new module (strict: every tensor is set)."""
    c = tokenizer.cfg
    mod = cls(specs=vocab.specs, num_levels=c.num_levels, codebook_size=c.codebook_size, chunk_len=c.chunk_len,
              latent_dim=c.latent_dim, hidden=c.hidden, num_layers=c.num_layers, embodiment_dim=c.embodiment_dim,
              first_id=vocab.first_id, max_tokens=vocab.max_tokens)
    t = lambda x, dtype=torch.float32: torch.as_tensor(np.array(x), dtype=dtype)
    sd = {"embed.weight": t(tokenizer.embed.embedding[...]), "codebook": t(tokenizer.codebook[...])}
    for i, layer in enumerate(tokenizer.decoder.layers):
      sd[f"layers.{i}.weight"] = t(layer.kernel[...]).T.contiguous()
      sd[f"layers.{i}.bias"] = t(layer.bias[...])
    sd["head.weight"] = t(tokenizer.decoder.head.kernel[...]).T.contiguous()
    sd["head.bias"] = t(tokenizer.decoder.head.bias[...])
    for name in ("mean", "std", "low", "high", "dim_mask"):
      sd[name] = t(getattr(tokenizer, name)[...])
    sd["is_discrete"] = t(tokenizer.is_discrete[...], torch.bool)
    sd["id_lo"] = t(vocab._lo, torch.long)
    sd["id_hi"] = t(vocab._hi, torch.long)
    sd["disc_off"] = t(vocab._disc_off, torch.long)
    mod.load_state_dict(sd, strict=True)
    return mod.eval()

  def embodiment_index(self, name: str) -> int:
    if name not in self.names:
      raise ValueError(f"unknown embodiment {name!r}; known: {list(self.names)}")
    return self.names.index(name)

  def check_ids(self, ids: torch.Tensor, emb: torch.Tensor) -> None:
    lo, hi = self.id_lo[emb], self.id_hi[emb]
    bad = ((hi > lo) & ((ids < lo) | (ids >= hi))).nonzero()
    if len(bad):
      r, p = (int(x) for x in bad[0])
      raise ValueError(f"token id {int(ids[r, p])} at row {r}, position {p} is outside the reserved ids "
                       f"[{int(lo[r, p])}, {int(hi[r, p])}) of embodiment {self.names[int(emb[r])]!r}")

  @torch.no_grad()
  def forward(self, ids: torch.Tensor, embodiment: torch.Tensor | int | str) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim != 2:
      raise ValueError(f"token ids must have shape [batch, tokens], got {tuple(ids.shape)}")
    b = ids.shape[0]
    if isinstance(embodiment, str):
      embodiment = self.embodiment_index(embodiment)
    emb = torch.as_tensor(embodiment, dtype=torch.long)
    if emb.ndim == 0:
      emb = emb.expand(b)
    if emb.shape != (b,):
      raise ValueError(f"embodiment ids must have shape [{b}], got {tuple(emb.shape)}")
    if int(emb.min()) < 0 or int(emb.max()) >= len(self.specs):
      raise ValueError(f"embodiment id out of range [0, {len(self.specs)}): {emb.tolist()}")
    if ids.shape[1] > self.max_tokens:
      raise ValueError(f"token ids have {ids.shape[1]} positions, more than max_tokens={self.max_tokens}")
    if ids.shape[1] < self.max_tokens:
      ids = torch.nn.functional.pad(ids, (0, self.max_tokens - ids.shape[1]), value=-1)
    self.check_ids(ids, emb)
    h, lv, k = self.chunk_len, self.num_levels, self.codebook_size
    out = torch.zeros(b, h, self.max_dim)
    if self.has_continuous:
      n = h * lv
      levels = (torch.arange(n) % lv)[None]
      codes = (ids[:, :n] - self.first_id - levels * k).clamp(0, k - 1).reshape(b, h, lv)
      zq = sum(self.codebook[level][codes[..., level]] for level in range(lv))
      x = torch.cat([zq.reshape(b, -1), self.embed(emb)], dim=-1)
      for layer in self.layers:
        x = torch.nn.functional.silu(layer(x))
      x = self.head(x).reshape(b, h, self.max_dim) * self.dim_mask[emb][:, None]
      a = x * self.std[emb][:, None] + self.mean[emb][:, None]
      a = torch.minimum(torch.maximum(a, self.low[emb][:, None]), self.high[emb][:, None])
      out = a * self.dim_mask[emb][:, None]
    if bool(self.is_discrete.any()):
      idx = (ids[:, :h] - self.disc_off[emb][:, None]).to(torch.float32)
      dact = torch.zeros(b, h, self.max_dim)
      dact[:, :, 0] = idx
      out = torch.where(self.is_discrete[emb][:, None, None], dact, out)
    return out

  def cut(self, actions: torch.Tensor, embodiment: str) -> torch.Tensor:
    """Actions [..., H, max_dim] of one embodiment -> its own dimension."""
    s = self.specs[self.embodiment_index(embodiment)].action_space
    return actions[..., : (s.dim if s.is_continuous else 1)]
