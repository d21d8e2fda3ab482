"""The episode dataset: an RLDS-style TFDS builder (array_record, no TensorFlow) and its checked reader.

One dataset per embodiment (action and state shapes differ), as a builder config of `gea_episodes`:

  DATA_DIR/gea_episodes/<embodiment>/1.0.0/
    gea_episodes-train.array_record-00000-of-0000N    one record per episode
    gea_episodes-heldout_seed.array_record-...        held-out splits (also heldout_combo for grid tasks)
    dataset_info.json, features.json                  TFDS's own description
    metadata.json                                     schema version, EmbodimentSpec JSON, episode lengths,
                                                      build arguments, expert success rates, file sizes
    normalization.json                                action/state statistics of the train split

Each record is an RLDS episode: `steps` is a nested `tfds.features.Dataset` of
observation/image, observation/state, action, reward, discount, is_first, is_last, is_terminal,
language_instruction and target_point (where the instruction's object is in the image, the label of SFT's
grounding loss; -1 when the embodiment does not say: `Embodiment.target_point`), plus `episode_metadata`
(embodiment, task, seed, expert, success, episode_id).
tfds 4.9.10 writes and reads nested Dataset features with NumPy only: a record decodes to a dict whose
`steps` is a lazy sequence (each step decoded on access). Images are stored as raw bytes with zlib
(`Encoding.ZLIB`), not as int64 lists (TFDS's default for uint8), which makes records ~30x faster to parse.

TFDS writes into `<embodiment>/incomplete.XXXX_1.0.0/` and renames it to `1.0.0/` only when every split and
every metadata file is written, so a crashed build never looks complete. `open_dataset` then checks the
schema version, the feature spec, the file sizes and wraps decoding errors with the file's name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipelines.normalization import NORMALIZATION_FILE, NormalizationStats, StatsAccumulator
from gea_jax.envs.spec import EmbodimentSpec

DATASET_NAME = "gea_episodes"
VERSION = "1.0.0"
SCHEMA_VERSION = 2  # 2: steps/target_point
SPLITS = ("train", "heldout_seed", "heldout_combo")  # the task splits of gea_jax.envs
EPISODE_KEYS = ("image", "state", "action", "reward", "discount", "is_first", "is_last", "is_terminal")
# An episode generator: (split, num_episodes, seed) -> iterable of episode dicts (see `validate_episode`).
EpisodesFn = Callable[[str, int, int], Iterable[dict[str, Any]]]


class DatasetError(ValueError):
  """A dataset on disk is missing, incomplete, built with another schema, or corrupted."""


def episode_features(spec: EmbodimentSpec) -> tfds.features.FeaturesDict:
  """The TFDS feature spec of one embodiment's episodes."""
  if spec.action_space.is_continuous:
    action = tfds.features.Tensor(shape=(spec.action_space.dim,), dtype=np.float32)
  else:
    action = tfds.features.Tensor(shape=(1,), dtype=np.int32)
  observation = {"image": tfds.features.Tensor(shape=tuple(spec.image_shape), dtype=np.uint8,
                                               encoding=tfds.features.Encoding.ZLIB)}
  if spec.state_dim > 0:  # TFDS cannot decode zero-width tensors inside a Dataset: no state, no feature
    observation["state"] = tfds.features.Tensor(shape=(spec.state_dim,), dtype=np.float32)
  return tfds.features.FeaturesDict({
      "steps": tfds.features.Dataset({
          "observation": observation,
          "action": action,
          "reward": tfds.features.Scalar(dtype=np.float32),
          "discount": tfds.features.Scalar(dtype=np.float32),
          "is_first": tfds.features.Scalar(dtype=np.bool_),
          "is_last": tfds.features.Scalar(dtype=np.bool_),
          "is_terminal": tfds.features.Scalar(dtype=np.bool_),
          "language_instruction": tfds.features.Text(),
          "target_point": tfds.features.Tensor(shape=(2,), dtype=np.float32),
      }),
      "episode_metadata": {
          "embodiment": tfds.features.Text(),
          "task": tfds.features.Text(),
          "seed": tfds.features.Scalar(dtype=np.int64),
          "expert": tfds.features.Text(),
          "success": tfds.features.Scalar(dtype=np.bool_),
          "episode_id": tfds.features.Scalar(dtype=np.int64),
      },
  })


def validate_episode(ep: Mapping[str, Any], spec: EmbodimentSpec, where: str) -> int:
  """Checks one expert episode against the spec; returns its length T. Errors name `where` and the key."""
  missing = [k for k in EPISODE_KEYS + ("instruction",) if k not in ep]
  if missing:
    raise ValueError(f"{where}: episode is missing keys {missing}")
  T = int(np.shape(ep["action"])[0]) if np.ndim(ep["action"]) else 0
  if T <= 0:
    raise ValueError(f"{where}: 'action' must have a leading time dimension T > 0, got shape {np.shape(ep['action'])}")
  da = spec.action_space.dim if spec.action_space.is_continuous else 1
  expected = {"image": (T, *spec.image_shape), "state": (T, spec.state_dim), "action": (T, da),
              "reward": (T,), "discount": (T,), "is_first": (T,), "is_last": (T,), "is_terminal": (T,)}
  for k, shape in expected.items():
    got = tuple(np.shape(ep[k]))
    if got != shape:
      raise ValueError(f"{where}: key {k!r} has shape {got}, expected {shape} (T={T}, embodiment {spec.name!r})")
  if np.asarray(ep["image"]).dtype != np.uint8:
    raise ValueError(f"{where}: key 'image' has dtype {np.asarray(ep['image']).dtype}, expected uint8")
  if not spec.action_space.is_continuous:
    a = np.asarray(ep["action"])
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"{where}: discrete key 'action' has dtype {a.dtype}, expected an integer type")
    if a.size and (a.min() < 0 or a.max() >= spec.action_space.num_actions):
      raise ValueError(f"{where}: discrete 'action' outside [0, {spec.action_space.num_actions})")
  for k in ("state", "action", "reward", "discount"):
    if not np.all(np.isfinite(np.asarray(ep[k], dtype=np.float64))):
      raise ValueError(f"{where}: key {k!r} contains NaN or inf")
  if not bool(np.asarray(ep["is_first"])[0]) or not bool(np.asarray(ep["is_last"])[-1]):
    raise ValueError(f"{where}: 'is_first' must be True at step 0 and 'is_last' True at the last step")
  if not isinstance(ep["instruction"], str):
    raise ValueError(f"{where}: 'instruction' must be a str, got {type(ep['instruction']).__name__}")
  if "target_point" in ep:  # optional: absent = the embodiment does not say (-1)
    tp = np.asarray(ep["target_point"], np.float64)
    if tp.shape != (T, 2):
      raise ValueError(f"{where}: key 'target_point' has shape {tp.shape}, expected {(T, 2)} (T={T})")
    if not np.all(np.isfinite(tp)) or np.any((tp != -1) & ((tp < 0) | (tp > 1))):
      raise ValueError(f"{where}: key 'target_point' must hold (row, col) fractions in [0, 1] or -1, got "
                       f"values in [{tp.min()}, {tp.max()}]")
  return T


def _text(x: Any) -> str:
  if isinstance(x, str):
    return x
  if isinstance(x, bytes):
    return x.decode("utf-8")
  return json.dumps(x, sort_keys=True, default=lambda o: np.asarray(o).tolist())


def target_points(ep: Mapping[str, Any], T: int) -> np.ndarray:
  """The episode's float32 [T, 2] target points; (-1, -1) rows when it has none."""
  if "target_point" not in ep:
    return np.full((T, 2), -1.0, np.float32)
  return np.asarray(ep["target_point"], np.float32).reshape(T, 2)


def _to_example(ep: Mapping[str, Any], spec: EmbodimentSpec, episode_id: int, T: int) -> dict[str, Any]:
  observation = {"image": np.asarray(ep["image"], np.uint8)}
  if spec.state_dim > 0:
    observation["state"] = np.asarray(ep["state"], np.float32).reshape(T, spec.state_dim)
  action = np.asarray(ep["action"])
  action = action.astype(np.float32) if spec.action_space.is_continuous else action.astype(np.int32)
  return {
      "steps": {
          "observation": observation,
          "action": action,
          "reward": np.asarray(ep["reward"], np.float32),
          "discount": np.asarray(ep["discount"], np.float32),
          "is_first": np.asarray(ep["is_first"], np.bool_),
          "is_last": np.asarray(ep["is_last"], np.bool_),
          "is_terminal": np.asarray(ep["is_terminal"], np.bool_),
          "language_instruction": [ep["instruction"]] * T,
          "target_point": target_points(ep, T),
      },
      "episode_metadata": {
          "embodiment": _text(ep.get("embodiment", spec.name)),
          "task": _text(ep.get("task", "")),
          "seed": int(ep.get("seed", -1)),
          "expert": _text(ep.get("expert", "")),
          "success": bool(ep.get("success", False)),
          "episode_id": int(episode_id),
      },
  }


class GeaEpisodes(tfds.core.GeneratorBasedBuilder):
  """RLDS episodes of one embodiment (the builder config name is the embodiment name)."""

  VERSION = tfds.core.Version(VERSION)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default lookup goes through `importlib_resources`, which is not installed (nor needed).
    return epath.Path(__file__)

  def __init__(self, *, spec: EmbodimentSpec, episodes_fn: EpisodesFn, num_episodes: Mapping[str, int],
               seed: int, build_args: Mapping[str, Any] | None = None, progress: bool = True, **kwargs):
    self._spec = spec
    self._episodes_fn = episodes_fn
    self._num_episodes = dict(num_episodes)
    self._seed = int(seed)
    self._build_args = dict(build_args or {})
    self._progress = progress
    self._lengths: dict[str, list[int]] = {}
    self._success: dict[str, float] = {}
    self._stats: NormalizationStats | None = None
    config = tfds.core.BuilderConfig(name=spec.name, version=VERSION,
                                    description=spec.description or spec.name)
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"Expert episodes of embodiment {self._spec.name!r}: {self._spec.description}",
        features=episode_features(self._spec),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # records stay in episode_id order, which `episode_lengths` indexes
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    unknown = [s for s in self._num_episodes if s not in SPLITS]
    if unknown:
      raise ValueError(f"unknown split names {unknown}; expected a subset of {SPLITS}")
    return {split: self._generate_examples(split) for split, n in self._num_episodes.items() if n > 0}

  def _generate_examples(self, split: str):
    from tqdm.auto import tqdm

    n = self._num_episodes[split]
    seed = self._seed  # the environments fold the split into their keys: splits draw disjoint tasks
    acc = StatsAccumulator(self._spec.name, self._spec.action_space.is_continuous)
    lengths, successes = [], []
    bar = tqdm(total=n, desc=f"{self._spec.name}/{split}", unit="ep", disable=not self._progress)
    count = 0
    for ep in self._episodes_fn(split, n, seed):
      if count >= n:
        raise ValueError(f"episode source for {self._spec.name!r}/{split} produced more than {n} episodes")
      where = f"{self._spec.name}/{split} episode {count}"
      T = validate_episode(ep, self._spec, where)
      if split == "train":
        acc.add(ep["action"], np.asarray(ep["state"]).reshape(T, self._spec.state_dim))
      lengths.append(T)
      successes.append(bool(ep.get("success", False)))
      yield count, _to_example(ep, self._spec, count, T)
      count += 1
      bar.update(1)
    bar.close()
    if count != n:
      raise ValueError(f"episode source for {self._spec.name!r}/{split} produced {count} episodes, expected {n}")
    self._lengths[split] = lengths
    self._success[split] = float(np.mean(successes))
    if split == "train":
      self._stats = acc.result()

  def _download_and_prepare(self, dl_manager, download_config):
    # Runs inside TFDS's incomplete dir: every file written here appears atomically with the data.
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    if "train" in self._num_episodes and self._stats is None:
      raise RuntimeError(f"{self._spec.name}: train split produced no statistics")
    out = epath.Path(self.data_dir)
    if self._stats is not None:
      self._stats.save(out / NORMALIZATION_FILE)
    sizes = {p.name: p.stat().length for p in sorted(out.iterdir()) if ".array_record-" in p.name}
    self.info.metadata.update({
        "gea_schema_version": SCHEMA_VERSION,
        "embodiment_spec": self._spec.to_json(),
        "episode_lengths": self._lengths,
        "expert_success_rate": self._success,
        "build_args": {"seed": self._seed, "num_episodes": self._num_episodes, **self._build_args},
        "file_sizes": sizes,
    })


def dataset_path(data_dir: str | os.PathLike, embodiment: str) -> epath.Path:
  return epath.Path(data_dir) / DATASET_NAME / embodiment / VERSION


def build_dataset(data_dir: str | os.PathLike, spec: EmbodimentSpec, episodes_fn: EpisodesFn,
                  num_episodes: Mapping[str, int], seed: int = 0, build_args: Mapping[str, Any] | None = None,
                  progress: bool = True, overwrite: bool = False) -> epath.Path:
  """Writes one embodiment's dataset under `data_dir` and returns its directory.

  `episodes_fn(split, n, seed)` yields `n` episode dicts (numpy arrays with leading dim T: image, state,
  action, reward, discount, is_first, is_last, is_terminal; plus instruction, task, seed, expert, success).
  An existing complete dataset is kept unless `overwrite`.
  """
  path = dataset_path(data_dir, spec.name)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to rebuild it")
  builder = GeaEpisodes(spec=spec, episodes_fn=episodes_fn, num_episodes=num_episodes, seed=seed,
                        build_args=build_args, progress=progress, data_dir=os.fspath(data_dir),
                        file_format="array_record")
  mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if not overwrite else tfds.download.GenerateMode.FORCE_REDOWNLOAD
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return path


# ---------------------------------------------------------------------------------------------------------
# Reading


def _flat_tensor_infos(features: tfds.features.FeatureConnector) -> dict[str, tuple[tuple, str]]:
  infos = tfds.core.utils.flatten_nest_dict(features.get_serialized_info())
  return {k: (tuple(v.shape), np.dtype(v.np_dtype).name) for k, v in infos.items()}


@dataclasses.dataclass
class EpisodeDataset:
  """One embodiment's dataset, opened and checked: random access to decoded episodes per split."""

  path: epath.Path
  spec: EmbodimentSpec
  normalization: NormalizationStats | None
  metadata: dict[str, Any]
  _builder: Any = dataclasses.field(repr=False)
  _sources: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

  @property
  def splits(self) -> tuple[str, ...]:
    return tuple(self._builder.info.splits.keys())

  def episode_lengths(self, split: str) -> np.ndarray:
    self._check_split(split)
    return np.asarray(self.metadata["episode_lengths"][split], dtype=np.int64)

  def num_episodes(self, split: str) -> int:
    return int(self.episode_lengths(split).shape[0])

  def files(self, split: str) -> list[str]:
    return sorted(p.name for p in self.path.iterdir() if f"-{split}.array_record-" in p.name)

  def _check_split(self, split: str) -> None:
    if split not in self.metadata["episode_lengths"]:
      raise DatasetError(f"{self.path}: no split {split!r}; available: {sorted(self.metadata['episode_lengths'])}")

  def data_source(self, split: str):
    """The TFDS random-access data source (records decode with NumPy; `steps` stays lazy)."""
    self._check_split(split)
    if split not in self._sources:
      self._sources[split] = self._builder.as_data_source(split=split)
    return self._sources[split]

  def episode(self, split: str, index: int) -> dict[str, Any]:
    """Decoded episode `index` of `split` (a dict with a lazy `steps` sequence); errors name the file."""
    src = self.data_source(split)
    try:
      ep = src[int(index)]
    except Exception as e:  # array_record raises RuntimeError on bad chunks, protobuf DecodeError on bad bytes
      raise DatasetError(f"{self.path}: cannot read episode {index} of split {split!r} from "
                         f"{self.files(split)} (truncated or corrupted file?): {type(e).__name__}: {e}") from e
    expected = int(self.metadata["episode_lengths"][split][index])
    if len(ep["steps"]) != expected:
      raise DatasetError(f"{self.path}: episode {index} of split {split!r} has {len(ep['steps'])} steps, "
                         f"metadata.json says {expected}: the files do not belong together")
    return ep

  def episode_arrays(self, split: str, index: int, images: bool = True) -> dict[str, Any]:
    """Episode `index` of `split` decoded at once into stacked arrays (the pipeline's fast path).

    Keys: image [T,H,W,3] uint8 (left out when `images=False`, which skips most of the decoding),
    state [T,ds] f32 ([T,0] without state), action [T,da], reward, discount, is_first, is_last,
    is_terminal [T], target_point [T,2] f32, language_instruction (list of T str), episode_metadata (dict).
    Parses the record with TFDS's NumPy example parser and decodes all steps at once (about 3x faster than
    decoding step by step through the lazy `steps` sequence).
    """
    self._check_split(split)
    src = self.data_source(split)
    try:
      raw = src.data_source[int(index)]
      ex = self._parser().parse_example(raw)
      st = ex["steps"]
      # Images are zlib-compressed raw uint8 (see `episode_features`). TFDS's own batched decode turns the
      # decompressed frames into a fixed-width bytes array, which drops trailing zero bytes: decode here.
      image = None
      if images:
        frames = [np.frombuffer(zlib.decompress(b), np.uint8) for b in st["observation"]["image"]]
        image = np.stack(frames).reshape(len(frames), *self.spec.image_shape)
    except Exception as e:
      raise DatasetError(f"{self.path}: cannot read episode {index} of split {split!r} from "
                         f"{self.files(split)} (truncated or corrupted file?): {type(e).__name__}: {e}") from e
    T = int(len(st["action"]))
    expected = int(self.metadata["episode_lengths"][split][index])
    if T != expected:
      raise DatasetError(f"{self.path}: episode {index} of split {split!r} has {T} steps, "
                         f"metadata.json says {expected}: the files do not belong together")
    ds = self.spec.state_dim
    state = np.asarray(st["observation"]["state"], np.float32).reshape(T, ds) if ds else np.zeros((T, 0), np.float32)
    out = {"state": state,
           "action": np.asarray(st["action"]).reshape(T, -1),
           "target_point": np.asarray(st["target_point"], np.float32).reshape(T, 2),
           "language_instruction": [x.decode("utf-8") if isinstance(x, bytes) else str(x)
                                    for x in st["language_instruction"]],
           "episode_metadata": dict(ex["episode_metadata"])}
    for k in ("reward", "discount", "is_first", "is_last", "is_terminal"):
      out[k] = np.asarray(st[k]).reshape(T)
    if image is not None:
      if image.shape[0] != T:
        raise DatasetError(f"{self.path}: episode {index} of split {split!r} has {image.shape[0]} images "
                           f"for {T} steps")
      out["image"] = image
    return out

  def _parser(self):
    if not hasattr(self, "_example_parser"):
      from tensorflow_datasets.core import example_parser

      self._example_parser = example_parser.ExampleParserNp(self._builder.info.features.get_serialized_info())
    return self._example_parser

  def steps(self, split: str, index: int, start: int = 0, stop: int | None = None) -> dict[str, Any]:
    """Steps [start, stop) of one episode, stacked into arrays, decoded through TFDS's lazy `steps`."""
    ep = self.episode(split, index)
    seq = ep["steps"]
    stop = len(seq) if stop is None else stop
    rows = [seq[t] for t in range(start, stop)]
    return stack_steps(rows, self.spec.state_dim)


def stack_steps(rows: list[dict[str, Any]], state_dim: int) -> dict[str, np.ndarray]:
  """Stacks decoded steps into arrays: image, state ([n, 0] when there is none), action, target_point, reward, ..."""
  if state_dim > 0:
    state = np.stack([r["observation"]["state"] for r in rows])
  else:
    state = np.zeros((len(rows), 0), np.float32)
  out = {
      "image": np.stack([r["observation"]["image"] for r in rows]),
      "state": state,
      "action": np.stack([r["action"] for r in rows]),
      "target_point": np.stack([np.asarray(r["target_point"], np.float32) for r in rows]).reshape(len(rows), 2),
      "language_instruction": [r["language_instruction"].decode("utf-8") for r in rows],
  }
  for k in ("reward", "discount", "is_first", "is_last", "is_terminal"):
    out[k] = np.asarray([r[k] for r in rows])
  return out


def read_json(path: epath.Path, what: str) -> dict[str, Any]:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise DatasetError(f"{path}: missing {what}; the dataset is incomplete, rebuild it") from None
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: {what} is not valid JSON ({e})") from None


def open_dataset(data_dir: str | os.PathLike, embodiment: str, check_files: bool = True) -> EpisodeDataset:
  """Opens and checks `data_dir/gea_episodes/<embodiment>/1.0.0`; raises DatasetError naming what is wrong."""
  root = epath.Path(data_dir)
  if not root.exists():
    raise DatasetError(f"data_dir {os.fspath(root)!r} does not exist; build it with "
                       f"`python -m data_pipelines.build --embodiments={embodiment} --data_dir={os.fspath(root)}`")
  emb_dir = root / DATASET_NAME / embodiment
  path = emb_dir / VERSION
  if not path.exists():
    built = sorted(p.name for p in emb_dir.iterdir()) if emb_dir.exists() else []
    complete = [b for b in built if not b.startswith("incomplete")]
    available = sorted(p.name for p in (root / DATASET_NAME).iterdir()) if (root / DATASET_NAME).exists() else []
    if complete:
      raise DatasetError(f"{emb_dir}: dataset of {embodiment!r} was built with version(s) {complete}; this code reads "
                         f"version {VERSION} (schema {SCHEMA_VERSION}): rebuild it with data_pipelines.build")
    if built:
      raise DatasetError(f"{emb_dir}: only an incomplete build ({built}) exists for {embodiment!r}; "
                         "the build did not finish: rebuild it")
    raise DatasetError(f"{root / DATASET_NAME}: no dataset for embodiment {embodiment!r} "
                       f"(available: {available}); build it with data_pipelines.build")
  meta = read_json(path / "metadata.json", "metadata.json")
  if meta.get("gea_schema_version") != SCHEMA_VERSION:
    raise DatasetError(f"{path / 'metadata.json'}: field 'gea_schema_version' is {meta.get('gea_schema_version')!r}, "
                       f"this code reads schema {SCHEMA_VERSION}: rebuild the dataset")
  for key in ("embodiment_spec", "episode_lengths", "file_sizes"):
    if key not in meta:
      raise DatasetError(f"{path / 'metadata.json'}: missing field {key!r}")
  try:
    spec = EmbodimentSpec.from_json(meta["embodiment_spec"])
  except (TypeError, ValueError, KeyError) as e:
    raise DatasetError(f"{path / 'metadata.json'}: field 'embodiment_spec' is not a valid EmbodimentSpec: {e}") from e
  if spec.name != embodiment:
    raise DatasetError(f"{path / 'metadata.json'}: embodiment_spec.name is {spec.name!r}, expected {embodiment!r}")
  try:
    builder = tfds.builder_from_directory(os.fspath(path))
  except Exception as e:
    raise DatasetError(f"{path}: TFDS cannot open the dataset ({type(e).__name__}: {e})") from e
  want, got = _flat_tensor_infos(episode_features(spec)), _flat_tensor_infos(builder.info.features)
  for key in sorted(set(want) | set(got)):
    if want.get(key) != got.get(key):
      raise DatasetError(f"{path / 'features.json'}: feature {key!r} is {got.get(key)} (shape, dtype), this code "
                         f"expects {want.get(key)} for {embodiment!r}: the dataset was built with another schema")
  if check_files:
    for name, size in meta["file_sizes"].items():
      f = path / name
      if not f.exists():
        raise DatasetError(f"{f}: data file listed in metadata.json is missing")
      actual = f.stat().length
      if actual != size:
        raise DatasetError(f"{f}: file has {actual} bytes, metadata.json says {size}: truncated or corrupted")
  norm = None
  if (path / NORMALIZATION_FILE).exists():
    try:
      norm = NormalizationStats.load(path / NORMALIZATION_FILE)
    except ValueError as e:
      raise DatasetError(str(e)) from e
  elif "train" in meta["episode_lengths"]:
    raise DatasetError(f"{path / NORMALIZATION_FILE}: missing; the dataset is incomplete, rebuild it")
  return EpisodeDataset(path=path, spec=spec, normalization=norm, metadata=meta, _builder=builder)
