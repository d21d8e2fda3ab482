"""The grain pipeline: sample contents, mixture proportions, per-process sharding, determinism, resume,
the tokenization/padding hooks and bad input. Datasets are built from the synthetic episodes of
test_dataset.py with the real builder.
"""

import collections

import numpy as np
import pytest
from test_dataset import ARM, COUNTS, GRID, build_toy, synthetic_episodes

from data_pipelines import pipeline as pl
from data_pipelines import rlds_builder as rb


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return build_toy(tmp_path_factory.mktemp("pipeline_episodes"))


def _iter(data_dir, **kw):
  args = dict(embodiments=["toy_arm", "toy_grid"], weights=[0.5, 0.5], batch_size=4, seed=0, shard_index=0,
              shard_count=1)
  args.update(kw)
  return pl.make_train_iterator(data_dir, **args)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_sample_is_the_normalized_window(data_dir):
  ds, info = pl.make_dataset(data_dir, ["toy_arm", "toy_grid"], batch_size=None, history=3, seed=0,
                             shard_index=0, shard_count=1, shuffle=False, num_epochs=1)
  assert info.max_state_dim == 3 and info.max_action_dim == 2 and info.embodiments == ("toy_arm", "toy_grid")
  raw = {s.name: list(synthetic_episodes(s)("train", COUNTS["train"], 1)) for s in (ARM, GRID)}
  stats = info.normalization[0]
  seen = 0
  for i in range(40):
    x = ds[i]
    emb = info.embodiments[int(x["embodiment_id"])]
    ep = raw[emb][int(x["episode_index"])]
    t = int(x["step_index"])
    pad = max(0, 2 - t)
    np.testing.assert_array_equal(x["history_mask"], np.arange(3) >= pad)
    np.testing.assert_array_equal(x["image"][pad:], ep["image"][t - 2 + pad: t + 1])
    assert not x["image"][:pad].any()
    assert x["instruction"] == ep["instruction"]
    assert bool(x["is_first"]) == (t == 0) and t < len(ep["action"]) - 1 and not x["is_last"]
    if emb == "toy_arm":
      want_a = (ep["action"][t - 2 + pad: t + 1] - stats.action.mean) / stats.action.std
      want_s = (ep["state"][t - 2 + pad: t + 1] - stats.state.mean) / stats.state.std
      np.testing.assert_allclose(x["actions"][pad:], want_a, rtol=1e-5, atol=1e-5)
      np.testing.assert_allclose(x["state"][pad:], want_s, rtol=1e-5, atol=1e-5)
      assert x["action_mask"].all() and x["state_mask"].all() and not x["is_discrete"]
      assert (x["action_indices"] == -1).all()
    else:
      np.testing.assert_array_equal(x["action_indices"][pad:], ep["action"][t - 2 + pad: t + 1, 0])
      assert (x["action_indices"][:pad] == -1).all()
      assert not x["action_mask"].any() and not x["state_mask"].any() and x["is_discrete"]
      assert not x["actions"].any() and not x["state"].any()
    assert not x["actions"][:pad].any() and not x["state"][:pad].any()
    want_tp = ep.get("target_point", np.full((len(ep["action"]), 2), -1.0))[t - 2 + pad: t + 1]
    np.testing.assert_array_equal(x["target_point"][pad:], want_tp)
    assert (x["target_point"][:pad] == -1).all()  # padding frames have no label
    seen += 1
  assert seen == 40


def test_mixture_proportions(data_dir):
  it = _iter(data_dir, weights={"toy_arm": 3.0, "toy_grid": 1.0}, batch_size=16)
  ids = np.concatenate([next(it)["embodiment_id"] for _ in range(25)])
  frac = np.mean(ids == 0)
  assert abs(frac - 0.75) < 0.02, frac
  it = _iter(data_dir, weights=[1.0, 4.0], batch_size=10)
  ids = np.concatenate([next(it)["embodiment_id"] for _ in range(20)])
  assert abs(np.mean(ids == 1) - 0.8) < 0.02


@pytest.mark.parametrize("shuffle", [False, True])
def test_sharding_is_disjoint_and_complete(data_dir, shuffle):
  shard_count = 3
  per_shard = []
  for shard in range(shard_count):
    ds, _ = pl.make_dataset(data_dir, ["toy_arm"], batch_size=None, history=2, seed=5, shard_index=shard,
                            shard_count=shard_count, shuffle=shuffle, num_epochs=1, shuffle_window=8)
    per_shard.append({(int(ds[i]["episode_index"]), int(ds[i]["step_index"])) for i in range(len(ds))})
    assert len(per_shard[-1]) == len(ds)  # no step twice within a shard
  lengths = rb.open_dataset(data_dir, "toy_arm").episode_lengths("train")
  everything = {(e, t) for e, n in enumerate(lengths) for t in range(n - 1)}  # the last step has no action
  for a in range(shard_count):
    for b in range(a + 1, shard_count):
      assert not per_shard[a] & per_shard[b]
  assert set().union(*per_shard) == everything
  # Each shard owns whole episodes.
  owners = collections.defaultdict(set)
  for s, steps in enumerate(per_shard):
    for e, _ in steps:
      owners[e].add(s)
  assert all(len(o) == 1 for o in owners.values())


def test_deterministic_for_a_seed(data_dir):
  a, b, c = _iter(data_dir, seed=3), _iter(data_dir, seed=3), _iter(data_dir, seed=4)
  ba = [next(a) for _ in range(5)]
  bb = [next(b) for _ in range(5)]
  bc = [next(c) for _ in range(5)]
  assert all(_equal(x, y) for x, y in zip(ba, bb))
  assert not all(_equal(x, y) for x, y in zip(ba, bc))


def test_epochs_reshuffle_and_cover(data_dir):
  ds, info = pl.make_dataset(data_dir, ["toy_grid"], batch_size=None, seed=0, shard_index=0, shard_count=1,
                             num_epochs=2, shuffle_window=4)
  n = info.steps_per_epoch[0]
  ep0 = [(int(ds[i]["episode_index"]), int(ds[i]["step_index"])) for i in range(n)]
  ep1 = [(int(ds[i]["episode_index"]), int(ds[i]["step_index"])) for i in range(n, 2 * n)]
  # Windows may straddle the epoch boundary; over both epochs every step comes exactly twice.
  assert collections.Counter(ep0 + ep1) == collections.Counter({k: 2 for k in set(ep0 + ep1)})
  assert len(set(ep0 + ep1)) == n and ep0 != ep1


def test_save_restore_reproduces_next_batches(data_dir):
  it = _iter(data_dir, seed=11)
  for _ in range(7):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  resumed = _iter(data_dir, seed=11)
  resumed.set_state(state)
  for want in expected:
    assert _equal(want, next(resumed))


def _toy_tokenize(sample):
  # A test tokenizer: instruction bytes, then one token per action dim (bins of the normalized action).
  text = np.frombuffer(sample["instruction"].encode(), np.uint8).astype(np.int32)
  if sample["is_discrete"]:
    act = np.asarray([256 + sample["action_indices"][-1]], np.int32)
  else:
    act = 300 + np.clip(np.round(sample["actions"][-1][sample["action_mask"]] * 4), -8, 8).astype(np.int32)
  tokens = np.concatenate([text, act])
  loss_mask = np.arange(len(tokens)) >= len(text)
  return {"tokens": tokens, "loss_mask": loss_mask, "image": sample["image"], "embodiment_id": sample["embodiment_id"]}


def test_tokenize_hook_and_padding(data_dir):
  it = _iter(data_dir, tokenize=_toy_tokenize, seq_len=48, batch_size=6)
  b = next(it)
  assert set(b) == {"tokens", "loss_mask", "attention_mask", "image", "embodiment_id"}
  assert b["tokens"].shape == (6, 48) and b["loss_mask"].shape == (6, 48)
  for row in range(6):
    n = int(b["attention_mask"][row].sum())
    assert b["attention_mask"][row, :n].all() and not b["tokens"][row, n:].any()
    assert not b["loss_mask"][row, n:].any()
    n_act = 1 if b["embodiment_id"][row] == 1 else 2
    assert b["loss_mask"][row].sum() == n_act and b["loss_mask"][row, n - n_act: n].all()


def test_too_long_sequence_names_key_and_sample(data_dir):
  it = _iter(data_dir, tokenize=_toy_tokenize, seq_len=8)
  with pytest.raises(ValueError, match="tokens in key 'tokens', more than seq_len=8.*episode="):
    next(it)


def test_bad_arguments(data_dir, tmp_path):
  with pytest.raises(rb.DatasetError, match="no dataset for embodiment 'toy_leg'"):
    _iter(data_dir, embodiments=["toy_arm", "toy_leg"])
  with pytest.raises(rb.DatasetError, match="does not exist"):
    _iter(tmp_path / "missing")
  with pytest.raises(ValueError, match="weights name embodiments \\['toy_leg'\\]"):
    _iter(data_dir, weights={"toy_leg": 1.0})
  with pytest.raises(ValueError, match="got 3 weights for 2 embodiments"):
    _iter(data_dir, weights=[1, 2, 3])
  with pytest.raises(ValueError, match="shard_index must be in"):
    _iter(data_dir, shard_index=3, shard_count=3)
  with pytest.raises(rb.DatasetError, match="fewer than shard_count=8"):
    _iter(data_dir, shard_index=7, shard_count=8)
  with pytest.raises(rb.DatasetError, match="no split 'heldout_combo'"):
    _iter(data_dir, split="heldout_combo")


def test_default_shard_is_the_jax_process(data_dir):
  _, info = pl.make_dataset(data_dir, ["toy_arm"], batch_size=2)
  assert (info.shard_index, info.shard_count) == (0, 1)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(data_dir):
  ref = _iter(data_dir, seed=2)
  want = [next(ref) for _ in range(8)]
  it = _iter(data_dir, seed=2, num_workers=2)
  try:
    got = [next(it) for _ in range(5)]
    state = it.get_state()
    got += [next(it) for _ in range(3)]
    assert all(_equal(x, y) for x, y in zip(want, got))
    it.set_state(state)  # rewinding a multi-worker iterator restarts its workers at that point
    assert all(_equal(next(it), w) for w in want[5:])
  finally:
    it.close()


def test_packing_fills_rows_with_segments(data_dir):
  def tok(sample):
    t = _toy_tokenize(sample)
    return {"tokens": t["tokens"], "loss_mask": t["loss_mask"], "image": sample["image"][-1:]}

  it = _iter(data_dir, tokenize=tok, seq_len=64, batch_size=3, packing=True,
             pack_lengths={"tokens": 64, "image": 4})
  b = next(it)
  assert b["tokens"].shape == (3, 64) and b["image"].shape == (3, 4, 16, 16, 3)
  seg = b["tokens_segment_ids"]
  assert (seg.max(axis=1) >= 2).all()  # rows hold several samples (each ~23 tokens)
  for row in range(3):
    n_seg = seg[row].max()
    # one image per packed sample, same segment numbering; loss only on action tokens of real segments
    assert (b["image_segment_ids"][row][:n_seg] == np.arange(1, n_seg + 1)).all()
    assert not b["loss_mask"][row][seg[row] == 0].any()
    for s in range(1, n_seg + 1):
      pos = b["tokens_positions"][row][seg[row] == s]
      np.testing.assert_array_equal(pos, np.arange(len(pos)))
  state = it.get_state()
  want = [next(it) for _ in range(2)]
  again = _iter(data_dir, tokenize=tok, seq_len=64, batch_size=3, packing=True,
                pack_lengths={"tokens": 64, "image": 4})
  again.set_state(state)
  assert all(_equal(w, next(again)) for w in want)
  with pytest.raises(ValueError, match="packing: the tokenized sample has keys"):
    next(_iter(data_dir, tokenize=tok, seq_len=64, packing=True, pack_lengths={"tokens": 64}))
