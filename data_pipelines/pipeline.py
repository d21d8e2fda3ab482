"""The grain input pipeline: episode datasets -> per-step samples -> tokens -> fixed-length batches.

One datum's way (grain `MapDataset`s up to the batch, so every stage is random access and the iterator
state is just a position; see `make_train_iterator`):

  EpisodeDataset (TFDS array_record, one per embodiment; data_pipelines.rlds_builder)
    -> StepWindows         per process shard of episodes; each epoch a seeded permutation of them; one
                           element per step with its history window of the last k steps, padded at the
                           episode start and marked by `history_mask`
    -> WindowShuffle       steps shuffled within windows of `shuffle_window` (an LRU cache of decoded
                           episodes keeps reads cheap: an episode is decoded once per window, not per step)
    -> Standardize         common keys for every embodiment: state/action normalized with the dataset's
                           statistics and zero-padded to the widest embodiment, with masks
    -> tokenize            a hook `tokenize(sample) -> dict` (the RVQ/SFT stages pass theirs)
    -> PadToLength         sequence keys padded to `seq_len`, with `loss_mask` and `attention_mask`
    -> mix                 weighted mixture across embodiments (grain's deterministic proportional mix)
    -> batch               `batch_size` samples per element (drop remainder)
    -> iterator            optional worker processes (grain `mp_prefetch`); `get_state()/set_state()`
  (packing=True instead: samples -> iterator/workers -> first-fit packing into rows -> batch)

The standardized sample (before `tokenize`), with k = history, Ds/Da the widest state/action dims:
  image [k,H,W,3] uint8, history_mask [k] bool, state [k,Ds] f32, state_mask [Ds] bool,
  actions [k,Da] f32 (continuous, normalized; the last row is the target), action_indices [k] int32
  (discrete; -1 where continuous or padded), action_mask [Da] bool, target_point [k,2] f32 (where the
  instruction's object is in each frame, (row, col) fractions; -1 where unknown or padded), is_discrete bool,
  instruction str, embodiment_id int32 (index into `embodiments`), reward/discount f32,
  is_first/is_last/is_terminal bool, episode_index/step_index int32 (provenance).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from data_pipelines.rlds_builder import DatasetError, EpisodeDataset, open_dataset
from gea_jax.envs.spec import EmbodimentSpec

Sample = dict[str, Any]
Tokenizer = Callable[[Sample], Sample]
DEFAULT_SEQUENCE_KEYS = ("tokens", "targets", "loss_mask", "positions", "segment_ids")


def passthrough_tokenize(sample: Sample) -> Sample:
  """The default tokenization hook: returns the standardized arrays unchanged."""
  return sample


def _resolve_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None and shard_count is None:
    import jax  # only here: the pipeline itself never needs jax

    return jax.process_index(), jax.process_count()
  if shard_index is None or shard_count is None:
    raise ValueError("pass both shard_index and shard_count, or neither (then jax.process_index/count are used)")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index must be in [0, shard_count={shard_count}), got {shard_index}")
  return int(shard_index), int(shard_count)


class StepWindows(grain.MapDataset):
  """Every step of one shard of an embodiment's episodes, as a window of the last `history` steps.

  The last step of each episode (RLDS: final observation, no action) is left out unless
  `include_last_step`.
  Element `i` of epoch `e = i // steps_per_epoch` is a step of the episode order `perm(seed, e)` (a seeded
  permutation of this shard's episodes; identity when `shuffle_episodes` is False). `num_epochs=None`
  repeats forever. Episodes `shard_index::shard_count` belong to this shard: shards are disjoint and
  together cover the split. The dataset reopens its files lazily in each worker process.
  """

  def __init__(self, data_dir: str | os.PathLike, embodiment: str, split: str = "train", *, history: int = 3,
               shard_index: int = 0, shard_count: int = 1, seed: int = 0, shuffle_episodes: bool = True,
               num_epochs: int | None = None, cache_mb: int = 256, include_last_step: bool = False,
               dataset: EpisodeDataset | None = None):
    super().__init__()
    if history < 1:
      raise ValueError(f"history must be >= 1, got {history}")
    self._data_dir = os.fspath(data_dir)
    self._embodiment = embodiment
    self._split = split
    self._history = int(history)
    self._seed = int(seed)
    self._shuffle = shuffle_episodes
    self._num_epochs = num_epochs
    self._cache_bytes = int(cache_mb) << 20
    ds = dataset or open_dataset(data_dir, embodiment)
    self.spec: EmbodimentSpec = ds.spec
    self.normalization = ds.normalization
    all_lengths = ds.episode_lengths(split)
    self.episode_ids = np.arange(len(all_lengths))[shard_index::shard_count]
    if len(self.episode_ids) == 0:
      raise DatasetError(f"{ds.path}: split {split!r} has {len(all_lengths)} episodes, fewer than shard_count="
                         f"{shard_count}: shard {shard_index} would be empty")
    # RLDS: the last step holds the final observation and no real action (zeros): not a training target.
    self._lengths = all_lengths[self.episode_ids] - (0 if include_last_step else 1)
    self.steps_per_epoch = int(self._lengths.sum())
    if self.steps_per_epoch == 0:
      raise DatasetError(f"{ds.path}: split {split!r} of shard {shard_index}/{shard_count} has no usable steps")
    self._ds: EpisodeDataset | None = ds
    self._init_runtime()

  def _init_runtime(self):
    self._cache: collections.OrderedDict[int, tuple[dict, int]] = collections.OrderedDict()
    self._cached_bytes = 0
    self._lock = threading.Lock()
    self._epoch_order: collections.OrderedDict[int, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()

  def __getstate__(self):
    state = dict(self.__dict__)
    for k in ("_cache", "_lock", "_epoch_order", "_ds"):
      state.pop(k, None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._ds = None
    self._init_runtime()

  def __len__(self) -> int:
    if self._num_epochs is None:
      return sys.maxsize
    return self._num_epochs * self.steps_per_epoch

  def __str__(self) -> str:
    return f"StepWindows({self._embodiment}/{self._split}, history={self._history})"

  def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions into episode_ids in visiting order, cumulative step ends) of one epoch."""
    with self._lock:
      hit = self._epoch_order.get(epoch)
    if hit is not None:
      return hit
    n = len(self.episode_ids)
    if self._shuffle:
      rng = np.random.default_rng(np.random.SeedSequence([self._seed, 0, epoch]))
      perm = rng.permutation(n)
    else:
      perm = np.arange(n)
    ends = np.cumsum(self._lengths[perm])
    with self._lock:
      self._epoch_order[epoch] = (perm, ends)
      while len(self._epoch_order) > 4:
        self._epoch_order.popitem(last=False)
    return perm, ends

  def locate(self, index: int) -> tuple[int, int]:
    """(episode index in the split, step) of element `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {self}")
    epoch, r = divmod(int(index), self.steps_per_epoch)
    perm, ends = self._order(epoch)
    j = int(np.searchsorted(ends, r, side="right"))
    start = int(ends[j - 1]) if j > 0 else 0
    return int(self.episode_ids[perm[j]]), r - start

  def _episode(self, episode: int) -> dict[str, Any]:
    """The decoded episode, from a per-process LRU cache bounded by `cache_mb`."""
    with self._lock:
      hit = self._cache.get(episode)
      if hit is not None:
        self._cache.move_to_end(episode)
        return hit[0]
      if self._ds is None:
        self._ds = open_dataset(self._data_dir, self._embodiment, check_files=False)
      ds = self._ds
    ep = ds.episode_arrays(self._split, episode)
    size = sum(v.nbytes for v in ep.values() if isinstance(v, np.ndarray))
    with self._lock:
      if episode not in self._cache:
        self._cache[episode] = (ep, size)
        self._cached_bytes += size
      while self._cached_bytes > self._cache_bytes and len(self._cache) > 1:
        _, (_, old) = self._cache.popitem(last=False)
        self._cached_bytes -= old
    return ep

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    episode, t = self.locate(index)
    ep = self._episode(episode)
    lo = max(0, t - self._history + 1)
    pad = self._history - (t + 1 - lo)
    window = {}
    for k in ("image", "state", "action", "target_point", "reward", "discount", "is_first", "is_last", "is_terminal"):
      x = ep[k][lo: t + 1]
      window[k] = _pad_front(x, pad) if pad else x
    window["language_instruction"] = ep["language_instruction"][t]
    window["history_mask"] = np.arange(self._history) >= pad
    window["episode_index"] = np.int32(episode)
    window["step_index"] = np.int32(t)
    return window


class WindowShuffle(grain.MapDataset):
  """Shuffles a MapDataset within consecutive windows of `window_size` elements, seeded per window.

  Unlike grain's WindowShuffleMapDataset, the last window of a finite dataset may be partial.
  """

  def __init__(self, parent: grain.MapDataset, *, window_size: int, seed: int):
    super().__init__(parent)
    self._window = int(window_size)
    self._seed = int(seed)
    self._perms: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_perms"], state["_lock"] = collections.OrderedDict(), None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f"WindowShuffle(window_size={self._window})"

  def _perm(self, w: int, size: int) -> np.ndarray:
    with self._lock:
      p = self._perms.get(w)
    if p is None:
      p = np.random.default_rng(np.random.SeedSequence([self._seed, 1, w])).permutation(size)
      with self._lock:
        self._perms[w] = p
        while len(self._perms) > 8:
          self._perms.popitem(last=False)
    return p

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    n = len(self._parent)
    if not 0 <= index < n:
      raise IndexError(f"index {index} out of range for a dataset of length {n}")
    w, j = divmod(int(index), self._window)
    size = min(self._window, n - w * self._window)
    return self._parent[w * self._window + int(self._perm(w, size)[j])]


def _pad_front(x: np.ndarray, n: int) -> np.ndarray:
  return np.concatenate([np.zeros((n, *x.shape[1:]), x.dtype), x], axis=0)


def _resize_nearest(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  h, w = images.shape[-3:-1]
  if (h, w) == tuple(size):
    return images
  rows = (np.arange(size[0]) * h // size[0]).astype(np.int64)
  cols = (np.arange(size[1]) * w // size[1]).astype(np.int64)
  return images[..., rows[:, None], cols[None, :], :]


@dataclasses.dataclass
class Standardize(grain.transforms.Map):
  """Maps one embodiment's window to the common keys (see the module docstring)."""

  embodiment_id: int
  spec: EmbodimentSpec
  normalization: Any  # NormalizationStats | None
  max_state_dim: int
  max_action_dim: int
  image_size: tuple[int, int]
  mode: str = "mean_std"

  def map(self, w: Sample) -> Sample:
    k = w["action"].shape[0]
    mask = w["history_mask"]
    ds, Da = self.spec.state_dim, self.max_action_dim
    state = np.zeros((k, self.max_state_dim), np.float32)
    if ds:
      s = w["state"].astype(np.float32)
      if self.normalization is not None and self.normalization.state is not None:
        s = self.normalization.state.normalize(s, self.mode)
      state[:, :ds] = np.where(mask[:, None], s, 0.0)
    actions = np.zeros((k, Da), np.float32)
    indices = np.full((k,), -1, np.int32)
    action_mask = np.zeros((Da,), np.bool_)
    if self.spec.action_space.is_continuous:
      da = self.spec.action_space.dim
      a = w["action"].astype(np.float32)
      if self.normalization is not None and self.normalization.action is not None:
        a = self.normalization.action.normalize(a, self.mode)
      actions[:, :da] = np.where(mask[:, None], a, 0.0)
      action_mask[:da] = True
    else:
      indices = np.where(mask, w["action"][:, 0].astype(np.int32), -1).astype(np.int32)
    state_mask = np.zeros((self.max_state_dim,), np.bool_)
    state_mask[:ds] = True
    return {
        "image": _resize_nearest(w["image"], self.image_size),
        "history_mask": mask,
        "state": state,
        "state_mask": state_mask,
        "actions": actions,
        "action_indices": indices,
        "action_mask": action_mask,
        "target_point": np.where(mask[:, None], w["target_point"].astype(np.float32), -1.0).astype(np.float32),
        "is_discrete": np.bool_(not self.spec.action_space.is_continuous),
        "instruction": w["language_instruction"],
        "embodiment_id": np.int32(self.embodiment_id),
        "reward": np.float32(w["reward"][-1]),
        "discount": np.float32(w["discount"][-1]),
        "is_first": np.bool_(w["is_first"][-1]),
        "is_last": np.bool_(w["is_last"][-1]),
        "is_terminal": np.bool_(w["is_terminal"][-1]),
        "episode_index": w["episode_index"],
        "step_index": w["step_index"],
    }


@dataclasses.dataclass
class Tokenize(grain.transforms.Map):
  """Applies the tokenization hook and checks that it returned a dict."""

  fn: Tokenizer

  def map(self, sample: Sample) -> Sample:
    out = self.fn(sample)
    if not isinstance(out, Mapping):
      raise TypeError(f"tokenize hook {self.fn!r} must return a dict, got {type(out).__name__}")
    return dict(out)


@dataclasses.dataclass
class PadToLength(grain.transforms.Map):
  """Pads the sequence keys present in a sample to `seq_len` along axis 0 (zeros).

  Adds `attention_mask` [seq_len] (True on real tokens) and, when the hook gave none, `loss_mask` (True on
  real tokens). A sequence longer than `seq_len` is an error naming the key, its length and the sample.
  """

  seq_len: int
  sequence_keys: tuple[str, ...] = DEFAULT_SEQUENCE_KEYS
  pad: bool = True  # False: only check lengths and add loss_mask (packing pads later)

  def map(self, sample: Sample) -> Sample:
    present = [k for k in self.sequence_keys if k in sample]
    if not present:
      if not self.pad:
        raise ValueError(f"packing needs sequence keys {list(self.sequence_keys)} in the tokenized sample; "
                         f"the tokenize hook returned {sorted(sample)}")
      return sample
    lengths = {k: int(np.shape(sample[k])[0]) for k in present}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"sequence keys of one sample have different lengths {lengths}")
    n = lengths[present[0]]
    if n > self.seq_len:
      where = f"embodiment_id={sample.get('embodiment_id')}, episode={sample.get('episode_index')}, " \
              f"step={sample.get('step_index')}"
      raise ValueError(f"tokenized sample has {n} tokens in key {present[0]!r}, more than seq_len={self.seq_len} "
                       f"({where}): raise seq_len or shorten the prompt")
    out = dict(sample)
    if "loss_mask" not in out:
      out["loss_mask"] = np.ones((n,), np.bool_)
    if not self.pad:
      return out
    for k in set(present) | {"loss_mask"}:
      x = np.asarray(out[k])
      out[k] = np.concatenate([x, np.zeros((self.seq_len - n, *x.shape[1:]), x.dtype)], axis=0)
    out["attention_mask"] = np.arange(self.seq_len) < n
    return out


@dataclasses.dataclass(frozen=True)
class PipelineInfo:
  """What a built pipeline contains: embodiment order (= embodiment_id), specs, padded widths."""

  embodiments: tuple[str, ...]
  weights: tuple[float, ...]
  specs: tuple[EmbodimentSpec, ...]
  normalization: tuple[Any, ...]
  max_state_dim: int
  max_action_dim: int
  image_size: tuple[int, int]
  shard_index: int
  shard_count: int
  steps_per_epoch: tuple[int, ...]


def _normalize_weights(embodiments: Sequence[str], weights) -> tuple[float, ...]:
  if weights is None:
    return tuple(1.0 for _ in embodiments)
  if isinstance(weights, Mapping):
    unknown = sorted(set(weights) - set(embodiments))
    if unknown:
      raise ValueError(f"weights name embodiments {unknown} that are not in embodiments={list(embodiments)}")
    weights = [weights.get(e, 0.0) for e in embodiments]
  weights = tuple(float(w) for w in weights)
  if len(weights) != len(embodiments):
    raise ValueError(f"got {len(weights)} weights for {len(embodiments)} embodiments {list(embodiments)}")
  if any(w <= 0 or not np.isfinite(w) for w in weights):
    raise ValueError(f"mixture weights must be finite and > 0, got {dict(zip(embodiments, weights))}")
  return weights


def make_dataset(data_dir: str | os.PathLike, embodiments: Sequence[str], weights=None, *, batch_size: int | None,
                 seq_len: int | None = None, history: int = 3, tokenize: Tokenizer | None = None, seed: int = 0,
                 split: str = "train", shard_index: int | None = None, shard_count: int | None = None,
                 shuffle: bool = True, shuffle_window: int = 1024, num_epochs: int | None = None,
                 normalization: str = "mean_std", image_size: tuple[int, int] | None = None,
                 sequence_keys: tuple[str, ...] = DEFAULT_SEQUENCE_KEYS,
                 cache_mb: int = 256, include_last_step: bool = False,
                 pad_sequences: bool = True) -> tuple[grain.MapDataset, PipelineInfo]:
  """The pipeline as a `grain.MapDataset` (of batches when `batch_size`, else of samples) and its info.

  See `make_train_iterator` for the arguments. With `num_epochs=None` the dataset is infinite.
  `pad_sequences=False` only checks the sequence lengths against `seq_len` (packing pads later).
  """
  if isinstance(embodiments, str):
    embodiments = [e for e in embodiments.split(",") if e]
  embodiments = tuple(embodiments)
  if not embodiments:
    raise ValueError("embodiments is empty")
  if len(set(embodiments)) != len(embodiments):
    raise ValueError(f"embodiments has duplicates: {list(embodiments)}")
  if normalization not in ("mean_std", "quantile", "none"):
    raise ValueError(f"normalization must be 'mean_std', 'quantile' or 'none', got {normalization!r}")
  weights = _normalize_weights(embodiments, weights)
  shard_index, shard_count = _resolve_shard(shard_index, shard_count)
  opened = [open_dataset(data_dir, e) for e in embodiments]
  specs = [d.spec for d in opened]
  max_state = max(s.state_dim for s in specs)
  max_action = max(s.action_space.dim if s.action_space.is_continuous else 0 for s in specs)
  shapes = {s.name: tuple(s.image_shape[:2]) for s in specs}
  if image_size is None:
    if len(set(shapes.values())) != 1:
      raise ValueError(f"embodiments have different image sizes {shapes}: pass image_size=(H, W) to resize")
    image_size = next(iter(shapes.values()))
  parts, steps = [], []
  for i, (name, ds) in enumerate(zip(embodiments, opened)):
    emb_seed = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
    part = StepWindows(data_dir, name, split, history=history, shard_index=shard_index, shard_count=shard_count,
                       seed=emb_seed, shuffle_episodes=shuffle, num_epochs=num_epochs,
                       cache_mb=cache_mb, include_last_step=include_last_step, dataset=ds)
    steps.append(part.steps_per_epoch)
    if shuffle and shuffle_window > 1:
      part = WindowShuffle(part, window_size=shuffle_window, seed=emb_seed)
    part = part.map(Standardize(i, ds.spec, ds.normalization, max_state, max_action, tuple(image_size), normalization))
    parts.append(part)
  mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  mixed = mixed.map(Tokenize(tokenize or passthrough_tokenize))
  if seq_len is not None:
    mixed = mixed.map(PadToLength(int(seq_len), tuple(sequence_keys), pad=pad_sequences))
  if batch_size is not None:
    mixed = mixed.batch(int(batch_size), drop_remainder=True)
  info = PipelineInfo(embodiments=embodiments, weights=weights, specs=tuple(specs),
                      normalization=tuple(d.normalization for d in opened), max_state_dim=max_state,
                      max_action_dim=max_action, image_size=tuple(image_size), shard_index=shard_index,
                      shard_count=shard_count, steps_per_epoch=tuple(steps))
  return mixed, info


def make_train_iterator(data_dir: str | os.PathLike, embodiments: Sequence[str] | str, weights=None, *,
                        batch_size: int, seq_len: int | None = None, history: int = 3,
                        tokenize: Tokenizer | None = None, seed: int = 0, split: str = "train",
                        shard_index: int | None = None, shard_count: int | None = None, num_workers: int = 0,
                        worker_buffer_size: int = 2, read_threads: int = 0, prefetch_buffer_size: int = 4,
                        packing: bool = False, pack_lengths: Mapping[str, int] | None = None,
                        num_packing_bins: int | None = None, **kwargs) -> grain.DatasetIterator:
  """The training input iterator: yields dicts of numpy arrays with leading dim `batch_size`.

  Args:
    data_dir: root of the datasets written by `python -m data_pipelines.build`.
    embodiments: names (or one comma-separated string); their order defines `embodiment_id`.
    weights: mixture weights (sequence aligned with `embodiments`, or a name -> weight mapping; default
      uniform). grain mixes them deterministically in exact integer proportions.
    batch_size: samples per batch **per process** (the global batch is batch_size * shard_count).
    seq_len: pad the tokenizer's sequence keys (tokens, targets, loss_mask, ...) to this length.
    history: k, the number of steps in each sample's window (the current one last).
    tokenize: `tokenize(sample) -> dict`; default passes the standardized arrays through.
    seed: everything random (episode order per epoch, window shuffles) derives from it.
    split: "train", "heldout_seed" or "heldout_combo" (see data_pipelines.rlds_builder.SPLITS).
    shard_index, shard_count: this process's part of the episodes; default jax.process_index()/count().
    num_workers: worker processes (grain `mp_prefetch`); 0 reads in this process. The batches do not
      depend on it.
    worker_buffer_size, read_threads, prefetch_buffer_size: grain buffering options.
    packing: pack several tokenized samples into each row (grain's first-fit packing over
      `num_packing_bins` bins, default batch_size) instead of one padded sample per row. `pack_lengths`
      maps every key the hook returns to its length per row (e.g. {"tokens": seq_len, "image": 8}: up to 8
      images per row); loss_mask is added at seq_len. Each packed key K gets K_segment_ids (0 = padding,
      1.. = the sample within the row) and K_positions. Packing runs in this process, after the workers.
    **kwargs: passed to `make_dataset` (shuffle, shuffle_window, num_epochs, normalization, image_size,
      sequence_keys, cache_mb, include_last_step).

  The iterator's `get_state()` is a small dict (put it in the checkpoint); `set_state(state)` on a fresh
  iterator built with the same arguments resumes with exactly the batches the old one would have yielded.
  The state's format depends on whether worker processes are used (grain's mp_prefetch keeps one position
  per worker): resume with the same `num_workers > 0` / `== 0` choice.
  """
  if packing:
    if seq_len is None or not pack_lengths:
      raise ValueError("packing=True needs seq_len and pack_lengths (every key the tokenize hook returns -> its "
                       "maximum length per row, e.g. {'tokens': seq_len, 'image': 8})")
    lengths = {"loss_mask": int(seq_len), **{k: int(v) for k, v in pack_lengths.items()}}
  ds, _ = make_dataset(data_dir, embodiments, weights, batch_size=None if packing else batch_size, seq_len=seq_len,
                       history=history, tokenize=tokenize, seed=seed, split=split, shard_index=shard_index,
                       shard_count=shard_count, pad_sequences=not packing, **kwargs)
  if packing:
    ds = ds.map(_PackableKeys(tuple(sorted(lengths))))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_buffer_size))
  if num_workers > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app use their defaults
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                           per_worker_buffer_size=worker_buffer_size))
  if packing:
    it_ds = grain.experimental.FirstFitPackIterDataset(
        it_ds, length_struct=lengths, num_packing_bins=int(num_packing_bins or batch_size), seed=seed,
        shuffle_bins=True)
    it_ds = it_ds.batch(int(batch_size), drop_remainder=True)
  return iter(it_ds)


@dataclasses.dataclass
class _PackableKeys(grain.transforms.Map):
  """Checks that a tokenized sample has exactly the keys of `pack_lengths`, each with a leading axis."""

  keys: tuple[str, ...]

  def map(self, sample: Sample) -> Sample:
    if tuple(sorted(sample)) != self.keys:
      raise ValueError(f"packing: the tokenized sample has keys {sorted(sample)}, pack_lengths (+ loss_mask) "
                       f"has {list(self.keys)}: they must be the same")
    scalars = [k for k in self.keys if np.ndim(sample[k]) == 0]
    if scalars:
      raise ValueError(f"packing: keys {scalars} are scalars; packed keys need a leading axis")
    return sample
