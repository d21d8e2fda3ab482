"""Episode datasets: TFDS build -> read round trip, metadata, normalization statistics and bad input.

Episodes here come from a small synthetic generator with the experts' episode structure (a test fixture:
the builder is the real one); test_pipeline.py reuses `ARM`, `GRID`, `synthetic_episodes`, `build_toy`.
"""

import json
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipelines import rlds_builder as rb
from data_pipelines.normalization import NormalizationStats, VectorStats
from gea_jax.envs.spec import ActionSpace, EmbodimentSpec

ARM = EmbodimentSpec(name="toy_arm", action_space=ActionSpace("continuous", 2, (-1.0, -1.0), (1.0, 1.0)),
                     image_shape=(16, 16, 3), state_dim=3, max_episode_steps=12, description="a toy arm")
GRID = EmbodimentSpec(name="toy_grid", action_space=ActionSpace("discrete", 1, names=("left", "right", "forward")),
                      image_shape=(16, 16, 3), state_dim=0, max_episode_steps=9, description="a toy grid agent")
COUNTS = {"train": 7, "heldout_seed": 3}


def synthetic_episodes(spec, fail_after=None):
  """episodes_fn(split, n, seed) -> episodes with random lengths, images, states and actions."""

  def fn(split, n, seed):
    for i in range(n):
      if fail_after is not None and i == fail_after:
        raise RuntimeError("simulated crash in the middle of a build")
      rng = np.random.default_rng([seed, i, rb.SPLITS.index(split)])
      T = int(rng.integers(3, spec.max_episode_steps + 1))
      if spec.action_space.is_continuous:
        action = rng.normal(0.5, 2.0, (T, spec.action_space.dim)).astype(np.float32)
      else:
        action = rng.integers(0, spec.action_space.num_actions, (T, 1)).astype(np.int32)
      yield {"image": rng.integers(0, 255, (T, *spec.image_shape), dtype=np.uint8),
             "state": rng.normal(-1.0, 3.0, size=(T, spec.state_dim)).astype(np.float32), "action": action,
             "reward": rng.random(T).astype(np.float32), "discount": np.ones(T, np.float32),
             "is_first": np.arange(T) == 0, "is_last": np.arange(T) == T - 1,
             "is_terminal": np.arange(T) == T - 1, "instruction": f"{split} task {i % 3} of {spec.name}",
             "embodiment": spec.name, "task": {"goal": i % 3}, "seed": seed * 1000 + i, "expert": "synthetic",
             "success": bool(i % 2),
             # the grid has target points (a step without one: -1); the arm leaves the key out (read back as -1)
             **({"target_point": np.where(rng.random((T, 1)) < 0.8, rng.random((T, 2)), -1.0).astype(np.float32)}
                if not spec.action_space.is_continuous else {})}

  return fn


def build_toy(data_dir, specs=(ARM, GRID), counts=COUNTS, seed=1):
  for spec in specs:
    rb.build_dataset(data_dir, spec, synthetic_episodes(spec), counts, seed=seed, progress=False)
  return data_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return build_toy(tmp_path_factory.mktemp("episodes"))


def _raw(spec, split, seed=1):
  return list(synthetic_episodes(spec)(split, COUNTS[split], seed))


@pytest.mark.parametrize("spec", [ARM, GRID], ids=lambda s: s.name)
def test_round_trip(data_dir, spec):
  ds = rb.open_dataset(data_dir, spec.name)
  assert ds.spec == spec
  assert set(ds.splits) == set(COUNTS)
  for split in COUNTS:
    raw = _raw(spec, split)
    np.testing.assert_array_equal(ds.episode_lengths(split), [len(e["action"]) for e in raw])
    for i in (0, len(raw) - 1):
      got = ds.steps(split, i)
      for k in ("image", "action", "reward", "discount", "is_first", "is_last", "is_terminal"):
        np.testing.assert_array_equal(got[k], raw[i][k], err_msg=k)
      np.testing.assert_array_equal(got["state"], raw[i]["state"].reshape(len(raw[i]["action"]), -1))
      np.testing.assert_array_equal(got["target_point"], raw[i].get("target_point", np.full((len(raw[i]["action"]), 2), -1.0)))
      assert got["language_instruction"] == [raw[i]["instruction"]] * len(raw[i]["action"])
      meta = ds.episode(split, i)["episode_metadata"]
      assert meta["embodiment"] == spec.name.encode() and meta["expert"] == b"synthetic"
      assert meta["seed"] == raw[i]["seed"] and meta["episode_id"] == i and meta["success"] == raw[i]["success"]
      assert json.loads(meta["task"]) == raw[i]["task"]
      fast = ds.episode_arrays(split, i)  # the pipeline's one-call decode agrees with TFDS's lazy steps
      for k, v in got.items():
        np.testing.assert_array_equal(fast[k], v, err_msg=k)
      assert fast["episode_metadata"]["seed"] == raw[i]["seed"]
      light = ds.episode_arrays(split, i, images=False)
      assert "image" not in light and np.array_equal(light["action"], got["action"])


def test_tfds_reads_it_back(data_dir):
  src = tfds.data_source("gea_episodes/toy_arm", data_dir=str(data_dir))
  assert set(src) == set(COUNTS)
  assert len(src["train"]) == COUNTS["train"]
  ep = src["train"][2]
  raw = _raw(ARM, "train")[2]
  steps = ep["steps"]
  assert len(steps) == len(raw["action"])
  np.testing.assert_array_equal(steps[1]["observation"]["image"], raw["image"][1])
  np.testing.assert_array_equal(steps[1]["action"], raw["action"][1])


def test_metadata_carries_spec_lengths_and_success(data_dir):
  path = rb.dataset_path(data_dir, "toy_grid")
  meta = json.loads((path / "metadata.json").read_text())
  assert meta["gea_schema_version"] == rb.SCHEMA_VERSION
  assert EmbodimentSpec.from_json(meta["embodiment_spec"]) == GRID
  raw = _raw(GRID, "train")
  assert meta["expert_success_rate"]["train"] == pytest.approx(np.mean([e["success"] for e in raw]))
  assert meta["build_args"]["seed"] == 1


def test_normalization_equals_numpy(data_dir):
  raw = _raw(ARM, "train")
  actions = np.concatenate([e["action"] for e in raw]).astype(np.float64)
  states = np.concatenate([e["state"] for e in raw]).astype(np.float64)
  stats = NormalizationStats.load(rb.dataset_path(data_dir, "toy_arm") / "normalization.json")
  for got, x in ((stats.action, actions), (stats.state, states)):
    np.testing.assert_allclose(got.mean, x.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.std, x.std(0), rtol=1e-5)
    np.testing.assert_allclose(got.min, x.min(0), rtol=1e-6)
    np.testing.assert_allclose(got.max, x.max(0), rtol=1e-6)
    np.testing.assert_allclose(got.q01, np.quantile(x, 0.01, axis=0), rtol=1e-5)
    np.testing.assert_allclose(got.q99, np.quantile(x, 0.99, axis=0), rtol=1e-5)
    assert got.count == x.shape[0]
  grid = rb.open_dataset(data_dir, "toy_grid").normalization
  assert grid.action is None and grid.state is None  # discrete actions, no state


def test_normalize_modes_invert():
  x = np.random.default_rng(0).normal(2.0, 5.0, (500, 4)).astype(np.float32)
  s = VectorStats.compute(x)
  z = s.normalize(x, "mean_std")
  np.testing.assert_allclose(z.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(z.std(0), 1.0, atol=1e-4)
  np.testing.assert_allclose(s.denormalize(z, "mean_std"), x, rtol=1e-5, atol=1e-4)
  q = s.normalize(x, "quantile")
  assert q.min() >= -1.0 and q.max() <= 1.0
  inside = (x > s.q01) & (x < s.q99)
  np.testing.assert_allclose(s.denormalize(q, "quantile")[inside], x[inside], rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="normalization mode"):
    s.normalize(x, "minmax")


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_data_dir(tmp_path):
  with pytest.raises(rb.DatasetError, match="does not exist"):
    rb.open_dataset(tmp_path / "nowhere", "toy_arm")


def test_unknown_embodiment(data_dir):
  with pytest.raises(rb.DatasetError, match="no dataset for embodiment 'toy_leg'.*toy_arm"):
    rb.open_dataset(data_dir, "toy_leg")


def test_unknown_embodiment_in_build_command(tmp_path, capsys):
  from data_pipelines import build

  assert build.main(["--embodiments=reacher,not_a_body", "--episodes=1", f"--data_dir={tmp_path}"]) == 2
  assert "not_a_body" in capsys.readouterr().err


def _copy(data_dir, tmp_path, name="toy_arm"):
  dst = tmp_path / "copy"
  shutil.copytree(data_dir / rb.DATASET_NAME / name, dst / rb.DATASET_NAME / name)
  return dst, rb.dataset_path(dst, name)


def test_other_version(data_dir, tmp_path):
  dst, path = _copy(data_dir, tmp_path)
  path.rename(path.parent / "0.9.0")
  with pytest.raises(rb.DatasetError, match=r"built with version\(s\) \['0.9.0'\]"):
    rb.open_dataset(dst, "toy_arm")


def test_other_schema_version(data_dir, tmp_path):
  dst, path = _copy(data_dir, tmp_path)
  meta = json.loads((path / "metadata.json").read_text())
  meta["gea_schema_version"] = 0
  (path / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(rb.DatasetError, match="metadata.json.*'gea_schema_version' is 0"):
    rb.open_dataset(dst, "toy_arm")


def test_other_features(data_dir, tmp_path):
  # A dataset whose files say the state has 3 dims while its spec says 4: built with another schema.
  dst, path = _copy(data_dir, tmp_path)
  meta = json.loads((path / "metadata.json").read_text())
  meta["embodiment_spec"]["state_dim"] = 4
  (path / "metadata.json").write_text(json.dumps(meta))
  with pytest.raises(rb.DatasetError, match=r"features.json: feature 'steps/observation/state' is \(\(None, 3\).*expects \(\(None, 4\)"):
    rb.open_dataset(dst, "toy_arm")


def test_truncated_file(data_dir, tmp_path):
  dst, path = _copy(data_dir, tmp_path)
  f = next(path.glob("*-train.array_record-*"))
  data = f.read_bytes()
  f.write_bytes(data[: len(data) // 2])
  with pytest.raises(rb.DatasetError, match=f"{f.name}: file has {len(data) // 2} bytes.*truncated"):
    rb.open_dataset(dst, "toy_arm")
  # Without the size check, reading still fails with the file named, never returns garbage.
  ds = rb.open_dataset(dst, "toy_arm", check_files=False)
  for read in (ds.episode, ds.episode_arrays):
    with pytest.raises(rb.DatasetError, match=f"cannot read episode .*{f.name}"):
      for i in range(ds.num_episodes("train")):
        read("train", i)


def test_corrupted_file(data_dir, tmp_path):
  dst, path = _copy(data_dir, tmp_path)
  f = next(path.glob("*-train.array_record-*"))
  data = bytearray(f.read_bytes())
  for j in range(len(data) // 3, len(data) // 3 + 64):
    data[j] ^= 0xFF
  f.write_bytes(bytes(data))  # same size: only the record checksums can tell
  ds = rb.open_dataset(dst, "toy_arm")
  for read in (ds.episode, ds.episode_arrays):
    with pytest.raises(rb.DatasetError, match=f"cannot read episode .*{f.name}.*corrupted"):
      for i in range(ds.num_episodes("train")):
        read("train", i)


def test_crashed_build_is_never_read_as_complete(tmp_path):
  with pytest.raises(RuntimeError, match="simulated crash"):
    rb.build_dataset(tmp_path, ARM, synthetic_episodes(ARM, fail_after=4), COUNTS, progress=False)
  assert not rb.dataset_path(tmp_path, "toy_arm").exists()
  with pytest.raises(rb.DatasetError, match="no dataset for embodiment 'toy_arm'"):
    rb.open_dataset(tmp_path, "toy_arm")
  # A build killed without cleanup leaves only TFDS's incomplete dir, which is never read.
  (tmp_path / rb.DATASET_NAME / "toy_arm" / f"incomplete.abc123_{rb.VERSION}").mkdir(parents=True)
  with pytest.raises(rb.DatasetError, match="only an incomplete build"):
    rb.open_dataset(tmp_path, "toy_arm")


def test_missing_metadata_file(data_dir, tmp_path):
  dst, path = _copy(data_dir, tmp_path)
  (path / "normalization.json").unlink()
  with pytest.raises(rb.DatasetError, match="normalization.json: missing"):
    rb.open_dataset(dst, "toy_arm")


def test_bad_episode_names_the_key(tmp_path):
  def bad(split, n, seed):
    for ep in synthetic_episodes(ARM)(split, n, seed):
      ep["state"] = ep["state"][:, :2]
      yield ep

  with pytest.raises(ValueError, match=r"toy_arm/train episode 0: key 'state' has shape \(\d+, 2\), expected"):
    rb.build_dataset(tmp_path, ARM, bad, COUNTS, progress=False)
  assert not rb.dataset_path(tmp_path, "toy_arm").exists()


@pytest.mark.parametrize("bad,match", [
    (lambda tp: tp[:, :1], r"key 'target_point' has shape \(\d+, 1\), expected"),
    (lambda tp: tp + 2.0, r"key 'target_point' must hold \(row, col\) fractions in \[0, 1\] or -1"),
])
def test_bad_target_point_names_the_key(tmp_path, bad, match):
  def fn(split, n, seed):
    for ep in synthetic_episodes(GRID)(split, n, seed):
      ep["target_point"] = bad(np.abs(ep["target_point"]))
      yield ep

  with pytest.raises(ValueError, match="toy_grid/train episode 0: " + match):
    rb.build_dataset(tmp_path, GRID, fn, COUNTS, progress=False)


def test_existing_dataset_is_kept(data_dir):
  with pytest.raises(FileExistsError, match="overwrite"):
    rb.build_dataset(data_dir, ARM, synthetic_episodes(ARM), COUNTS, progress=False)


def test_chunked_rollouts_keep_episode_seeds():
  from data_pipelines.build import chunked_episodes

  calls = []

  def rollout(name, n, seed, task_split):  # like experts.rollout: episode i resets with seed + i
    calls.append((n, seed, task_split))
    return [{"seed": seed + i, "task_split": task_split} for i in range(n)]

  eps = list(chunked_episodes(rollout, "toy_arm", chunk=4)("heldout_seed", 10, 100))
  assert [e["seed"] for e in eps] == list(range(100, 110))
  assert calls == [(4, 100, "heldout_seed"), (4, 104, "heldout_seed"), (4, 108, "heldout_seed")]
  assert [e["seed"] for e in chunked_episodes(rollout, "toy_arm", chunk=16)("train", 3, 7)] == [7, 8, 9]


def test_action_noise_reaches_the_train_split_only_and_is_recorded(tmp_path):
  """build(action_noise=...): the rollout gets the noise for "train" only; build_args record it; keeping the
  dataset under another noise is an error naming both; bad specs are named."""
  from data_pipelines.build import build, parse_action_noise
  from gea_jax.envs.registry import make

  spec = make("reacher").spec
  asked = []

  def rollout(name, n, seed, task_split, action_noise=0.0):
    asked.append((task_split, action_noise))
    return list(synthetic_episodes(spec)(task_split, n, seed))

  out = build(["reacher"], 4, str(tmp_path), heldout_episodes=2, rollout=rollout, progress=False,
              action_noise=parse_action_noise("reacher=0.3"))
  assert sorted(set(asked)) == [("heldout_seed", 0.0), ("train", 0.3)]
  meta = json.loads((rb.dataset_path(str(tmp_path), "reacher") / "metadata.json").read_text())
  assert meta["build_args"]["action_noise"] == 0.3 and out["reacher"]["episodes"] == {"train": 4, "heldout_seed": 2}
  assert build(["reacher"], 4, str(tmp_path), rollout=rollout, progress=False,
               action_noise={"reacher": 0.3})["reacher"]["kept"]
  with pytest.raises(ValueError, match=r"built with action_noise=0.3, this build asks for 0.0"):
    build(["reacher"], 4, str(tmp_path), rollout=rollout, progress=False)
  with pytest.raises(ValueError, match="not among the embodiments"):
    build(["reacher"], 4, str(tmp_path), rollout=rollout, progress=False, action_noise={"pusher": 0.1})
  for bad in ("reacher", "reacher=-1", "reacher=abc", "=0.2"):
    with pytest.raises(ValueError, match="embodiment=noise"):
      parse_action_noise(bad)
  assert parse_action_noise(" reacher=0.3, pusher=0 ") == {"reacher": 0.3, "pusher": 0.0}
