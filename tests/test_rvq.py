"""RVQ action tokenizer: quantization, EMA + dead-code restart, masking, sharding, training, artifact, PyTorch."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from gea_jax import sharding
from gea_jax.envs.spec import ActionSpace, EmbodimentSpec
from gea_jax.tokenizers.action_vocab import build_vocab
from gea_jax.tokenizers.artifact import ArtifactError, load_artifact, read_metadata, save_artifact
from gea_jax.tokenizers.rvq import ActionTokenizer, RVQConfig
from gea_jax.train import tokenizer as trainer

SPECS = (
    EmbodimentSpec("arm2", ActionSpace("continuous", 2, (-1.0, -1.0), (1.0, 1.0))),
    EmbodimentSpec("walker5", ActionSpace("continuous", 5, (-2.0,) * 5, (2.0,) * 5)),
    EmbodimentSpec("grid", ActionSpace("discrete", 1, names=("left", "right"))),
)


def _small(**kw):
  base = dict(num_levels=2, codebook_size=32, latent_dim=8, hidden=64, chunk_len=1, dead_code_threshold=3)
  base.update(kw)
  return RVQConfig(**base)


def _known_distribution(rng, n):
  """arm2: 4 clusters; walker5: a 2-D manifold (correlated dims) -- both learnable with few codes."""
  centers = np.array([[0.5, 0.5], [-0.5, 0.5], [0.5, -0.5], [-0.5, -0.5]])
  arm = centers[rng.integers(0, 4, n)] + 0.08 * rng.normal(size=(n, 2))
  u = rng.uniform(-1, 1, (n, 2))
  walker = np.stack([u[:, 0], u[:, 1], 0.5 * (u[:, 0] + u[:, 1]), u[:, 0] * u[:, 1], -u[:, 0]], -1)
  walker += 0.02 * rng.normal(size=walker.shape)
  return {"arm2": (SPECS[0], np.clip(arm, -1, 1).astype(np.float32)),
          "walker5": (SPECS[1], np.clip(walker, -2, 2).astype(np.float32))}


def _config(steps=300, **rvq):
  c = ml_collections.ConfigDict()
  c.trainer = "tokenizer"
  c.rvq = ml_collections.ConfigDict(dict(num_levels=2, codebook_size=32, latent_dim=8, hidden=64, num_layers=2,
                                         chunk_len=1, embodiment_dim=8, commitment=0.25, ema_decay=0.95,
                                         dead_code_threshold=20))
  c.rvq.update(rvq)
  c.train = ml_collections.ConfigDict(dict(steps=steps, batch_size=256, lr=3e-3, warmup_steps=20, seed=0,
                                           log_every=100, eval_size=2000))
  c.data = ml_collections.ConfigDict(dict(source="experts", data_dir="", split="train", max_episodes=0,
                                          expert_episodes=4, embodiments=("arm2", "walker5", "grid")))
  c.vocab = ml_collections.ConfigDict(dict(llm_vocab_size=1000, mode="extend"))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  return c


def test_codebook_vectors_round_trip_exactly():
  m = ActionTokenizer(_small(num_levels=1), SPECS, rngs=nnx.Rngs(0))
  cb = m.codebook[...][0]
  quantize = nnx.jit(lambda mm, z: mm.quantize(z))
  zq, codes, _ = quantize(m, cb)
  np.testing.assert_array_equal(codes[:, 0], np.arange(32))
  np.testing.assert_array_equal(zq, cb)
  # two levels: level-1 vectors much smaller than the spacing of level 0 -> every sum maps back to its codes
  m2 = ActionTokenizer(_small(num_levels=2), SPECS, rngs=nnx.Rngs(1))
  c = np.asarray(m2.codebook[...]).copy()
  c[1] *= 0.01
  m2.codebook[...] = jnp.asarray(c)
  pairs = np.stack(np.meshgrid(np.arange(32), np.arange(32)), -1).reshape(-1, 2)
  z = nnx.jit(lambda mm, c: mm.lookup(c))(m2, jnp.asarray(pairs))
  zq, codes, _ = quantize(m2, z)
  np.testing.assert_array_equal(codes, pairs)
  np.testing.assert_allclose(zq, z, atol=1e-6)


def test_dead_codes_are_restarted_from_current_inputs():
  m = ActionTokenizer(_small(num_levels=1, codebook_size=8, dead_code_threshold=2), SPECS, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.uniform(-1, 1, (64, 1, 5)).astype(np.float32))
  e = jnp.ones((64,), jnp.int32)
  fwd = nnx.jit(lambda mm, a, e: mm(a, e))
  upd = nnx.jit(lambda mm, out, k: mm.ema_update(out["codes"], out["level_inputs"], out["weight"], k))
  nnx.jit(lambda mm, k: mm.init_codebooks(a, e, k))(m, jax.random.key(3))  # codes 0..4: encoder outputs
  cb = np.asarray(m.codebook[...]).copy()
  cb[0, 5:] = 1e3  # far away: never chosen
  m.codebook[...] = jnp.asarray(cb)
  m.ema_sum[...] = jnp.asarray(cb)
  out = fwd(m, a, e)
  assert not np.isin(np.asarray(out["codes"]), [5, 6, 7]).any()
  st = upd(m, out, jax.random.key(0))
  assert int(st["restarted"][0]) == 0 and np.all(np.asarray(m.unused_steps[...])[0, 5:] == 1)
  out = fwd(m, a, e)
  st = upd(m, out, jax.random.key(1))
  assert int(st["restarted"][0]) == 3
  new = np.asarray(m.codebook[...])[0, 5:]
  inputs = np.asarray(out["level_inputs"]).reshape(-1, 8)
  for v in new:  # each restarted code is one of this step's encoder outputs
    assert np.min(np.abs(inputs - v).max(-1)) < 1e-6
  assert np.all(np.asarray(m.unused_steps[...])[0, 5:] == 0)
  assert np.max(np.abs(new)) < 1e2
  out = fwd(m, a, e)
  used = np.unique(np.asarray(out["codes"]))
  assert len(used) > 5  # the restarted codes are used again


def test_padded_dimensions_are_ignored():
  m = ActionTokenizer(_small(), SPECS, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  a = np.zeros((16, 1, 5), np.float32)
  a[:, :, :2] = rng.uniform(-1, 1, (16, 1, 2))
  e = jnp.zeros((16,), jnp.int32)
  junk = a.copy()
  junk[:, :, 2:] = rng.normal(size=(16, 1, 3)) * 100

  @nnx.jit
  def loss_and_grads(mm, x):
    return nnx.value_and_grad(lambda m_: m_(x, e)["loss"])(mm)

  (l1, g1), (l2, g2) = loss_and_grads(m, jnp.asarray(a)), loss_and_grads(m, jnp.asarray(junk))
  assert float(l1) == float(l2)
  jax.tree.map(np.testing.assert_array_equal, g1, g2)
  enc = nnx.jit(lambda mm, x, e: mm.encode(x, e))
  np.testing.assert_array_equal(enc(m, jnp.asarray(a), e), enc(m, jnp.asarray(junk), e))
  dec = np.asarray(nnx.jit(lambda mm, c, e: mm.decode(c, e))(m, enc(m, jnp.asarray(a), e), e))
  assert np.all(dec[:, :, 2:] == 0)
  # discrete rows carry no weight in the loss
  out = nnx.jit(lambda mm, x, e: mm(x, e))(m, jnp.asarray(a), jnp.full((16,), 2, jnp.int32))
  assert float(out["loss"]) == 0.0 and float(jnp.sum(out["weight"])) == 0.0


def test_ema_statistics_are_summed_across_devices():
  assert jax.device_count() == 8
  cfg = _small(codebook_size=16)
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (64, 1, 5)).astype(np.float32)
  e = rng.integers(0, 2, 64).astype(np.int32)

  def run(model, a, e):
    out = model(a, e)
    model.ema_update(out["codes"], out["level_inputs"], out["weight"], jax.random.key(0))
    return out["loss"]

  single = ActionTokenizer(cfg, SPECS, rngs=nnx.Rngs(0))
  loss1 = nnx.jit(run)(single, jnp.asarray(a), jnp.asarray(e))
  mesh = sharding.make_mesh((8, 1, 1))
  sharded = sharding.create_sharded(lambda: ActionTokenizer(cfg, SPECS, rngs=nnx.Rngs(0)), mesh)
  with sharding.use_mesh(mesh):
    batch = sharding.shard_batch({"a": a, "e": e}, mesh)
    assert len(batch["a"].sharding.device_set) == 8
    loss8 = nnx.jit(run)(sharded, batch["a"], batch["e"])
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  for name in ("ema_count", "ema_sum", "codebook"):
    np.testing.assert_allclose(np.asarray(getattr(sharded, name)[...]), np.asarray(getattr(single, name)[...]),
                               rtol=1e-5, atol=1e-6, err_msg=name)
  # the counts are global: every (weighted) row is counted once over the 8 shards
  assert float(np.asarray(sharded.ema_count[...]).sum()) == pytest.approx(2 * (0.99 * 16 + 0.01 * 64), rel=1e-5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("rvq_run")
  config = _config(steps=300)
  source = _known_distribution(np.random.default_rng(0), 20000)
  # error before training, through the same encode -> decode path
  before = ActionTokenizer(trainer.rvq_config(config), SPECS,
                           {n: trainer.ActionSource(*v).stats() for n, v in source.items()},
                           rngs=nnx.Rngs(0))
  vocab0 = build_vocab(before, llm_vocab_size=1000)
  nmse0 = {n: trainer.nmse_through_vocab(vocab0, v[1][:2000, None], SPECS.index(v[0])) for n, v in source.items()}
  result = trainer.run(config, str(workdir), source=source, specs=SPECS)
  return workdir, result, nmse0, source


def test_training_reduces_reconstruction_error(trained):
  workdir, result, nmse0, _ = trained
  for name in ("arm2", "walker5"):
    assert result.nmse[name] < 0.25 * nmse0[name], (name, result.nmse[name], nmse0[name])
    assert result.nmse[name] < 0.1, (name, result.nmse[name])
  first, last = result.history[0], result.history[-1]
  assert last["recon"] < first["recon"]
  assert last["perplexity/level0"] > 4
  assert (workdir / "report.md").exists() and (workdir / "metrics.jsonl").exists()
  assert "recon/walker5" in (workdir / "metrics.jsonl").read_text()


def test_artifact_restores_and_decodes_identically(trained, tmp_path):
  workdir, result, _, source = trained
  tok, vocab = load_artifact(workdir / "artifact")
  meta = read_metadata(workdir / "artifact")
  assert meta["config"]["rvq"]["codebook_size"] == 32 and set(meta["normalization"]) == {"arm2", "walker5"}
  assert vocab.layout == result.vocab.layout and tok.specs == SPECS
  rng = np.random.default_rng(5)
  emb = np.array([0, 1, 2, 1, 0], np.int32)
  a = np.zeros((5, 1, 5), np.float32)
  a[0, :, :2], a[4, :, :2] = source["arm2"][1][:2, None]
  a[1, 0], a[3, 0] = source["walker5"][1][:2]
  a[2, 0, 0] = 1
  ids = vocab.encode(a, emb)
  np.testing.assert_array_equal(ids, result.vocab.encode(a, emb))
  np.testing.assert_array_equal(vocab.decode(ids, emb), result.vocab.decode(ids, emb))
  state_a = nnx.to_pure_dict(nnx.state(tok))
  state_b = nnx.to_pure_dict(nnx.state(result.tokenizer))
  jax.tree.map(np.testing.assert_array_equal, state_a, state_b)
  # saving again over an existing artifact replaces it atomically
  save_artifact(tmp_path / "art", tok, vocab)
  save_artifact(tmp_path / "art", tok, vocab, metrics={"again": 1})
  assert read_metadata(tmp_path / "art")["metrics"] == {"again": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["art"]
  del rng


def test_torch_decoder_matches_jax(trained):
  torch = pytest.importorskip("torch")
  from gea_jax.tokenizers.torch_decoder import TorchRVQDecoder

  workdir, result, _, _ = trained
  dec = TorchRVQDecoder.from_artifact(workdir / "artifact")
  vocab = result.vocab
  rng = np.random.default_rng(0)
  emb = rng.integers(0, 3, 64).astype(np.int32)
  ids = np.zeros((64, vocab.max_tokens), np.int64)
  for r, e in enumerate(emb):
    for p in range(vocab.max_tokens):
      lo, hi = vocab.id_range(int(e), p)
      ids[r, p] = rng.integers(lo, hi) if hi > lo else -1
  want = np.asarray(vocab.decode(ids.astype(np.int32), emb))
  got = dec(torch.as_tensor(ids), torch.as_tensor(emb)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  assert np.abs(want).max() > 0.1  # not trivially zero
  ids[0, 0] = 5
  with pytest.raises(ValueError, match="outside the reserved ids"):
    dec(torch.as_tensor(ids), torch.as_tensor(emb))
  with pytest.raises(ValueError, match="unknown embodiment 'hopper'"):
    dec(torch.as_tensor(ids[:1]), "hopper")


def test_bad_artifact_and_source_errors(tmp_path):
  with pytest.raises(ArtifactError, match="not found"):
    load_artifact(tmp_path / "missing")
  (tmp_path / "junk").mkdir()
  with pytest.raises(ArtifactError, match="junk"):
    load_artifact(tmp_path / "junk")
  with pytest.raises(ValueError, match=r"source 'arm2': actions must be \[N, 2\]"):
    trainer.as_sources({"arm2": (SPECS[0], np.zeros((10, 3)))})
  with pytest.raises(ValueError, match="its EmbodimentSpec is named 'arm2'"):
    trainer.as_sources({"walker": (SPECS[0], np.zeros((10, 2)))})
  with pytest.raises(ValueError, match="NaN"):
    trainer.as_sources({"arm2": (SPECS[0], np.full((10, 2), np.nan))})
  with pytest.raises(ValueError, match="normalization stats of 'arm2'"):
    ActionTokenizer(_small(), SPECS, {"arm2": {"mean": np.zeros(3), "std": np.ones(3)}}, rngs=nnx.Rngs(0))


def test_chunks_stay_within_episodes():
  a = np.arange(10, dtype=np.float32)[:, None].repeat(2, 1)
  starts = np.zeros(10, bool)
  starts[[0, 4]] = True
  c = trainer.ActionSource(SPECS[0], a, episode_starts=starts).chunks(3)
  assert c.shape == (2 + 4, 3, 2)
  assert all(np.all(np.diff(x[:, 0]) == 1) for x in c) and 3 not in c[:, 0, 0] and 2 not in c[:, 0, 0]


@pytest.mark.parametrize("key,value,match", [
    ("rvq.codebook_size", 0, "rvq.codebook_size: must be > 0"),
    ("rvq.ema_decay", 1.0, r"rvq.ema_decay: must be in \(0, 1\)"),
    ("train.batch_size", -4, "train.batch_size: must be > 0"),
    ("data.source", "s3", "data.source: must be one of"),
    ("vocab.mode", "append", "vocab.mode: must be one of"),
    ("mesh.shape", (2, 2), "mesh.shape: must have 3 entries"),
])
def test_config_validation_names_the_key(key, value, match):
  import importlib.util
  import pathlib
  spec = importlib.util.spec_from_file_location("rvq_cfg", pathlib.Path(__file__).parents[1] / "configs/rvq.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config()
  trainer.validate(config)
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(ValueError, match=match):
    trainer.validate(config)


def test_tfds_source_reads_actions_and_saved_stats(tmp_path):
  from test_dataset import ARM, GRID, build_toy

  data_dir = build_toy(tmp_path / "episodes")
  sources, specs = trainer.load_tfds_source(str(data_dir), [ARM.name, GRID.name])
  assert [s.name for s in specs] == [ARM.name, GRID.name] and list(sources) == [ARM.name]
  src = sources[ARM.name]
  from data_pipelines.rlds_builder import open_dataset
  ds = open_dataset(data_dir, ARM.name)
  lengths = ds.episode_lengths("train")
  assert src.actions.shape == (int(lengths.sum()) - len(lengths), 2)  # each episode's final zero action dropped
  assert src.episode_starts.sum() == len(lengths)
  np.testing.assert_allclose(src.stats()["mean"], ds.normalization.action.mean)
  first = ds.steps("train", 0)["action"][:-1]
  np.testing.assert_array_equal(src.actions[: len(first)], first)
  chunks = src.chunks(3)
  assert chunks.shape[1:] == (3, 2)
