"""Tests for gea_jax.checkpoint and gea_jax.train.loop_utils: round trip on a mesh, keep-last-N, corrupted
checkpoints, exact resume, SIGTERM in a real subprocess, non-finite loss."""

import functools
import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from gea_jax import sharding
from gea_jax.checkpoint import Checkpointer, CheckpointError, abstract_like, load_step_meta
from gea_jax.train.loop_utils import NonFiniteLossError, check_finite, install_sigterm_handler

REPO = Path(__file__).resolve().parents[1]


def _sharded_state():
  mesh = sharding.make_mesh((2, 2, 2))
  init = nnx.initializers.lecun_normal()
  model = sharding.create_sharded(
    lambda: nnx.Linear(64, 128, kernel_init=nnx.with_partitioning(init, ("embed", "mlp")),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)), rngs=nnx.Rngs(0)),
    mesh)
  params = nnx.state(model, nnx.Param)
  opt_state = optax.adam(1e-3).init(params)
  return params, opt_state


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _save_steps(workdir, params, opt_state, steps, **kw):
  with Checkpointer(workdir, keep=kw.pop("keep", 3), save_every=1, **kw) as ck:
    for s in steps:
      p = jax.tree.map(lambda x, s=s: x + s, params)
      ck.save(s, params=p, opt_state=opt_state, rng=jax.random.key(s), data_state={"next_index": s},
              extra={"loss": 1.0 / s})


def test_roundtrip_sharded_nnx_state_config_versions_assets(tmp_path):
  params, opt_state = _sharded_state()
  config = ml_collections.ConfigDict({"model": {"width": 128}, "seed": 7, "name": "tiny"})
  artifact = tmp_path / "tokenizer_artifact"
  (artifact / "sub").mkdir(parents=True)
  (artifact / "codebook.json").write_text('{"levels": 2}')
  (artifact / "sub" / "stats.npy").write_bytes(b"\x00\x01\x02")
  data_state = {"next_index": 12, "blob": b"\x00\xffgrain"}

  ck = Checkpointer(tmp_path / "run", keep=2, async_save=True, save_every=10, config=config)
  ck.save_assets("tokenizer", artifact)
  shutil.rmtree(artifact)  # the checkpoint holds its own copy
  assert ck.save(10, params=params, opt_state=opt_state, rng=jax.random.key(3), data_state=data_state,
                 extra={"loss": np.float32(0.25), "tokens": 1000})
  ck.close()

  ck = Checkpointer(tmp_path / "run", keep=2)
  r = ck.restore_latest(abstract_like(params), abstract_like(opt_state))
  assert r.step == 10
  _leaves_equal(r.params, params)
  _leaves_equal(r.opt_state, opt_state)
  for got, want in zip(jax.tree.leaves(r.params), jax.tree.leaves(params)):
    assert got.sharding == want.sharding
  assert jax.random.key_data(r.rng).tolist() == jax.random.key_data(jax.random.key(3)).tolist()
  assert r.data_state == data_state
  assert r.extra == {"loss": 0.25, "tokens": 1000}
  assert r.config == json.loads(config.to_json_best_effort())
  assert r.versions["jax"] == jax.__version__ and "orbax-checkpoint" in r.versions and "gea_jax" in r.versions
  assert (ck.asset_path("tokenizer") / "codebook.json").read_text() == '{"levels": 2}'
  assert (ck.asset_path("tokenizer") / "sub" / "stats.npy").read_bytes() == b"\x00\x01\x02"
  with pytest.raises(FileNotFoundError, match="'vocab'.*assets \\['tokenizer'\\]"):
    ck.asset_path("vocab")
  # a step directory describes itself, without the Checkpointer
  meta = load_step_meta(tmp_path / "run" / "checkpoints" / "10")
  assert meta["config"]["model"]["width"] == 128 and meta["step"] == 10
  assert (meta["assets"]["tokenizer"] / "codebook.json").exists()
  # export/eval can read the arrays without knowing the model
  with Checkpointer(tmp_path / "run", read_only=True) as reader:
    as_saved = reader.restore(10, None).params
    _leaves_equal(as_saved, params)
    # on the default device, whatever devices saved them (a pod's checkpoint read on a workstation;
    # tests/test_multihost.py reads a 2-process run's that way)
    assert all(x.sharding.device_set == {jax.local_devices()[0]} for x in jax.tree.leaves(as_saved))
  # the restored run keeps carrying the asset into its following checkpoints
  assert ck.save(20, params=params, opt_state=opt_state, force=True)
  ck.close()
  assert (tmp_path / "run" / "checkpoints" / "20" / "assets" / "tokenizer" / "codebook.json").exists()


def test_save_every_keep_last_n_and_no_overwrite(tmp_path):
  params = {"w": jnp.ones((4, 4))}
  with Checkpointer(tmp_path, keep=2, save_every=2, async_save=False) as ck:
    saved = [s for s in range(1, 8) if ck.save(s, params=params)]
    assert saved == [2, 4, 6]
    assert ck.save(7, params=params, force=True)
    assert not ck.save(7, params=params, force=True)  # already on disk: never overwritten
    assert ck.all_steps() == [6, 7]
    assert ck.latest_step == 7
  assert Checkpointer(tmp_path, read_only=True).restore_latest({"w": jax.ShapeDtypeStruct((4, 4), jnp.float32)}).step == 7


def test_no_checkpoint_returns_none(tmp_path):
  with Checkpointer(tmp_path) as ck:
    assert ck.restore_latest({"w": jax.ShapeDtypeStruct((2,), jnp.float32)}) is None


def _array_files(step_dir):
  files = [f for f in glob.glob(str(step_dir / "params" / "**" / "d" / "*"), recursive=True) if os.path.isfile(f)]
  return sorted(files, key=os.path.getsize)


def _truncate_array_file(step_dir):
  big = _array_files(step_dir)[-1]  # the data file holding the (16 KiB+) kernel
  with open(big, "r+b") as f:
    f.truncate(os.path.getsize(big) // 2)


def _delete_array_file(step_dir):
  os.remove(_array_files(step_dir)[-1])


def _damage_array_metadata(step_dir):
  (step_dir / "params" / "_METADATA").write_text('{"tree_metadata": {"kernel": ')


def _damage_state_json(step_dir):
  (step_dir / "state" / "metadata").write_text('{"step": 3, "rng": {"typed"')


@pytest.mark.parametrize("corrupt", [_truncate_array_file, _delete_array_file, _damage_array_metadata,
                                     _damage_state_json])
def test_corrupted_latest_falls_back_to_previous(tmp_path, caplog, corrupt):
  params = {"kernel": jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128), "bias": jnp.zeros(128)}
  opt_state = optax.adam(1e-3).init(params)
  _save_steps(tmp_path, params, opt_state, [1, 2, 3])
  bad = tmp_path / "checkpoints" / "3"
  corrupt(bad)

  ck = Checkpointer(tmp_path, keep=3)
  with caplog.at_level(logging.ERROR, logger="gea_jax.checkpoint"):
    r = ck.restore_latest(abstract_like(params), abstract_like(opt_state))
  assert r.step == 2
  _leaves_equal(r.params, jax.tree.map(lambda x: x + 2, params))
  assert r.data_state == {"next_index": 2}
  errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
  assert any("checkpoint step 3" in m and str(bad) in m and "falling back" in m for m in errors), errors
  # the unreadable step is kept aside, never picked again, and the run can save that step anew
  assert ck.all_steps() == [1, 2]
  assert (tmp_path / "checkpoints_corrupt" / "3").is_dir()
  assert ck.save(3, params=params, opt_state=opt_state, force=True)
  ck.close()
  assert Checkpointer(tmp_path).restore_latest(abstract_like(params), abstract_like(opt_state)).step == 3


def test_two_corrupted_steps_and_partial_tmp_dir_are_skipped(tmp_path, caplog):
  params = {"kernel": jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128)}
  _save_steps(tmp_path, params, None, [1, 2, 3])
  _truncate_array_file(tmp_path / "checkpoints" / "3")
  _damage_state_json(tmp_path / "checkpoints" / "2")
  # a save that was killed half-way leaves orbax's tmp directory: it must never be picked
  partial = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(tmp_path / "checkpoints" / "1", partial)
  shutil.rmtree(partial / "state")
  with caplog.at_level(logging.ERROR, logger="gea_jax.checkpoint"):
    with Checkpointer(tmp_path, read_only=True) as ck:
      assert ck.all_steps() == [1, 2, 3]
      r = ck.restore_latest(abstract_like(params))
  assert r.step == 1
  text = "\n".join(rec.getMessage() for rec in caplog.records)
  assert "checkpoint step 3" in text and "checkpoint step 2" in text
  assert not (tmp_path / "checkpoints_corrupt").exists()  # read_only never moves anything


def test_mismatched_target_raises_and_moves_nothing(tmp_path):
  params = {"kernel": jnp.ones((8, 16))}
  _save_steps(tmp_path, params, None, [1, 2])
  with Checkpointer(tmp_path) as ck:
    with pytest.raises(CheckpointError, match=r"no checkpoint .* could be restored.*step 2.*step 1"):
      ck.restore_latest({"kernel": jax.ShapeDtypeStruct((8, 32), jnp.float32)})
    assert ck.all_steps() == [1, 2]
  assert not (tmp_path / "checkpoints_corrupt").exists()


def test_mismatch_error_names_the_config_keys_that_differ(tmp_path):
  """A run whose arrays do not fit the checkpoint (e.g. a head added since) is told which config keys changed."""
  saved = ml_collections.ConfigDict({"model": {"grounding_head": False, "hidden": 8}, "sft": {"steps": 10}})
  with Checkpointer(tmp_path, async_save=False, config=saved) as ck:
    ck.save(1, params={"kernel": jnp.ones((8, 16))}, force=True)
  now = ml_collections.ConfigDict({"model": {"grounding_head": True, "hidden": 8}, "sft": {"steps": 20}})
  target = {"kernel": jax.ShapeDtypeStruct((8, 16), jnp.float32), "head": jax.ShapeDtypeStruct((8,), jnp.float32)}
  with Checkpointer(tmp_path, read_only=True, config=now) as ck:
    with pytest.raises(CheckpointError) as err:
      ck.restore_latest(target)
  msg = str(err.value)
  assert "model.grounding_head: saved False, now True" in msg and "sft.steps: saved 10, now 20" in msg
  assert msg.index("model.grounding_head") < msg.index("sft.steps") and "model.hidden" not in msg
  with Checkpointer(tmp_path, read_only=True, config=saved) as ck:  # same config: no such hint
    with pytest.raises(CheckpointError) as err:
      ck.restore_latest(target)
  assert "differs" not in str(err.value)


def test_resume_under_a_changed_config_warns_naming_the_keys(tmp_path, caplog):
  """A resumed run whose settings changed (e.g. a loss term switched on) restores, and is told which keys changed:
  its optimizer state was built under the old ones. Read-only readers (PPO reading the SFT run) are not."""
  saved = ml_collections.ConfigDict({"ppo": {"sft_coef": 0.0, "lr": 1e-3}})
  with Checkpointer(tmp_path, async_save=False, config=saved) as ck:
    ck.save(1, params={"kernel": jnp.ones((4,))}, force=True)
  target = {"kernel": jax.ShapeDtypeStruct((4,), jnp.float32)}
  now = ml_collections.ConfigDict({"ppo": {"sft_coef": 0.5, "lr": 1e-3}})

  def warnings_after(**kw):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gea_jax.checkpoint"):
      with Checkpointer(tmp_path, **kw) as ck:
        assert ck.restore_latest(target).step == 1
    return [r.getMessage() for r in caplog.records if r.name == "gea_jax.checkpoint" and r.levelno == logging.WARNING]

  (msg,) = warnings_after(config=now)
  assert "ppo.sft_coef: saved 0.0, now 0.5" in msg and "ppo.lr" not in msg and "step 1" in msg
  assert warnings_after(config=saved) == []
  assert warnings_after(config=now, read_only=True) == []


def test_unreadable_directory_errors_name_the_path(tmp_path):
  with pytest.raises(CheckpointError, match=str(tmp_path / "nothing")):
    Checkpointer(tmp_path / "nothing", read_only=True)
  with pytest.raises(CheckpointError, match="is .* a gea_jax checkpoint step directory"):
    load_step_meta(tmp_path)
  with pytest.raises(FileNotFoundError, match="not a directory"):
    Checkpointer(tmp_path / "w").save_assets("tok", tmp_path / "missing")


# ----------------------------------------------------------------------------------------------------
# Exact resume: 10 steps uninterrupted == 5 steps + checkpoint + restore + 5 steps, bit for bit.


def _dataset(n=96, batch=8):
  rs = np.random.RandomState(0)
  x = rs.randn(n, 3).astype(np.float32)
  y = (x @ np.array([1.5, -2.0, 0.5], np.float32) + 0.3 + 0.1 * rs.randn(n)).astype(np.float32)
  ds = (grain.MapDataset.range(n).shuffle(seed=11).repeat(None)
        .map(lambda i: {"x": x[i], "y": y[i]}).batch(batch))
  return ds


@functools.lru_cache(maxsize=None)
def _make_train_step(total_steps):
  """The optimizer and the jitted step (built once per test session: the runs share one compiled program)."""
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 0.5, 2, total_steps), weight_decay=1e-2)

  def loss_fn(params, batch, key):
    noise = 0.05 * jax.random.normal(key, batch["x"].shape)  # per-step randomness, e.g. augmentation
    pred = (batch["x"] + noise) @ params["w"] + params["b"]
    return jnp.mean((pred - batch["y"]) ** 2)

  @jax.jit
  def step_fn(params, opt_state, batch, base_key, step):
    key = jax.random.fold_in(base_key, step)
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return tx, step_fn


def _run(workdir, total_steps, stop_after=None):
  """A tiny trainer: resumes from ``workdir`` when it holds a checkpoint; returns (losses, params)."""
  tx, step_fn = _make_train_step(total_steps)
  mesh = sharding.make_mesh((-1, 1, 1))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = jax.device_put({"w": jnp.zeros(3), "b": jnp.zeros(())}, replicated)
  opt_state = jax.device_put(tx.init(params), replicated)
  base_key = jax.device_put(jax.random.key(42), replicated)
  it = iter(_dataset().to_iter_dataset())
  ck = Checkpointer(workdir, keep=2, save_every=1000)
  start = 0
  restored = ck.restore_latest(abstract_like(params, mesh), abstract_like(opt_state, mesh))
  if restored is not None:
    params, opt_state, start = restored.params, restored.opt_state, restored.step
    base_key = jax.device_put(restored.rng, replicated)
    it.set_state(restored.data_state)
  losses = {}
  for step in range(start, total_steps):
    batch = next(it)
    params, opt_state, loss = step_fn(params, opt_state, batch, base_key, step)
    losses[step] = np.asarray(loss)
    check_finite(loss, step + 1)
    if stop_after is not None and step + 1 == stop_after:
      ck.save(step + 1, params=params, opt_state=opt_state, rng=base_key, data_state=it.get_state(), force=True)
      break
  ck.close()
  return losses, params


def test_resume_is_bit_identical(tmp_path):
  full_losses, full_params = _run(tmp_path / "full", 10)
  first, _ = _run(tmp_path / "resumed", 10, stop_after=5)
  second, resumed_params = _run(tmp_path / "resumed", 10)
  assert sorted(first) == [0, 1, 2, 3, 4] and sorted(second) == [5, 6, 7, 8, 9]
  resumed_losses = {**first, **second}
  for s in range(10):
    assert resumed_losses[s].tobytes() == full_losses[s].tobytes(), f"loss differs at step {s}"
  _leaves_equal(resumed_params, full_params)
  # the loop really trains: the full-data error of the final params is below that of the zero init
  batch = _dataset(batch=96)[0]
  mse = lambda p: float(np.mean((batch["x"] @ np.asarray(p["w"]) + np.asarray(p["b"]) - batch["y"]) ** 2))
  assert mse(full_params) < 0.5 * mse({"w": np.zeros(3), "b": np.zeros(())})


# ----------------------------------------------------------------------------------------------------
# SIGTERM and non-finite losses.

_SIGTERM_SCRIPT = textwrap.dedent("""
  import sys, time
  import jax, jax.numpy as jnp
  from gea_jax.checkpoint import Checkpointer
  from gea_jax.train.loop_utils import install_sigterm_handler

  workdir = sys.argv[1]
  stop = install_sigterm_handler()
  ck = Checkpointer(workdir, keep=2, save_every=1000)
  params = {"w": jnp.zeros((16, 16))}
  update = jax.jit(lambda p: jax.tree.map(lambda x: x + 1.0, p))
  step = 0
  while step < 100000:
    params = update(params)
    step += 1
    jax.block_until_ready(params)
    print(f"step {step}", flush=True)
    if ck.save(step, params=params, rng=jax.random.key(0), data_state={"next_index": step}, force=stop.requested):
      print(f"saved {step}", flush=True)
    if stop.requested:
      break
    time.sleep(0.02)
  ck.close()
  print(f"exit at {step}", flush=True)
""")


def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path):
  script = tmp_path / "loop.py"
  script.write_text(_SIGTERM_SCRIPT)
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS="")
  stderr = open(tmp_path / "stderr.txt", "w")  # a file, so a chatty child never blocks on a full pipe
  proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdout=subprocess.PIPE,
                          stderr=stderr, text=True, env=env)
  try:
    lines = []
    for line in proc.stdout:
      lines.append(line.strip())
      if line.strip() == "step 3":
        proc.send_signal(signal.SIGTERM)
        break
    out, _ = proc.communicate(timeout=180)
  finally:
    if proc.poll() is None:
      proc.kill()
    stderr.close()
  err = (tmp_path / "stderr.txt").read_text()
  lines += [ln.strip() for ln in out.splitlines()]
  assert proc.returncode == 0, err[-2000:]
  exit_lines = [ln for ln in lines if ln.startswith("exit at")]
  assert exit_lines, lines
  final = int(exit_lines[-1].split()[-1])
  assert final >= 3
  assert f"saved {final}" in lines
  with Checkpointer(tmp_path / "run", read_only=True) as ck:
    assert ck.all_steps() == [final]
    r = ck.restore_latest({"w": jax.ShapeDtypeStruct((16, 16), jnp.float32)})
  assert r.step == final and r.data_state == {"next_index": final}
  np.testing.assert_array_equal(np.asarray(r.params["w"]), np.full((16, 16), float(final), np.float32))


def test_sigterm_handler_in_process_and_uninstall():
  before = signal.getsignal(signal.SIGTERM)
  with install_sigterm_handler() as stop:  # one process: Python's handler, the stop at the next boundary
    assert not stop.requested and not stop.stop_at(1)
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.signal_number == signal.SIGTERM and stop.stop_at(2)
  assert signal.getsignal(signal.SIGTERM) == before


def test_check_finite_names_step_and_metric():
  check_finite(jnp.float32(1.5), 3)
  check_finite({"loss": 0.1, "grad_norm": np.float32(2.0)}, 3)
  with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 7: loss=nan"):
    check_finite(jnp.float32(jnp.nan), 7)
  with pytest.raises(NonFiniteLossError, match=r"non-finite grad_norm at step 9: grad_norm=inf"):
    check_finite({"loss": 0.1, "grad_norm": jnp.inf}, 9)
  with pytest.raises(ValueError, match="must be a scalar"):
    check_finite(jnp.ones(3), 1)


def test_nan_loss_stops_run_and_keeps_last_good_checkpoint(tmp_path):
  params = {"w": jnp.ones(4)}
  ck = Checkpointer(tmp_path, keep=5, save_every=1)
  losses = [1.0, 0.5, 0.25, float("nan"), 0.1]
  with pytest.raises(NonFiniteLossError) as info:
    for step, loss in enumerate(losses, start=1):
      params = jax.tree.map(lambda x: x * 0.5, params)
      check_finite(jnp.float32(loss), step, checkpointer=ck)
      ck.save(step, params=params, extra={"loss": loss})
  assert info.value.step == 4 and info.value.last_good_step == 3
  assert "last good checkpoint is step 3" in str(info.value) and str(ck.directory) in str(info.value)
  with pytest.raises(NonFiniteLossError, match="non-finite train/loss at step 4"):  # save's own safety net
    ck.save(4, params=params, extra={"train/loss": jnp.float32(jnp.inf)}, force=True)
  assert ck.all_steps() == [1, 2, 3]
  ck.close()
  r = Checkpointer(tmp_path).restore_latest({"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
  assert r.step == 3 and r.extra == {"loss": 0.25}


def test_arrays_item_roundtrips_and_may_be_absent(tmp_path):
  """``arrays`` (e.g. PPO's running episodes) is saved and restored beside the params; a step written without it
  restores with ``arrays`` None, target or not."""
  params = {"w": jnp.arange(4.0)}
  arrays = {"reacher": {"000": jnp.arange(6, dtype=jnp.int32).reshape(3, 2), "001": jnp.ones((3,), jnp.uint8)}}
  with Checkpointer(tmp_path, keep=3) as ckpt:
    ckpt.save(1, params=params, arrays=arrays, force=True)
    ckpt.save(2, params=params, force=True)
  with Checkpointer(tmp_path, read_only=True) as ckpt:
    got = ckpt.restore(1, abstract_like(params), abstract_arrays=abstract_like(arrays))
    for k, v in arrays["reacher"].items():
      np.testing.assert_array_equal(np.asarray(got.arrays["reacher"][k]), np.asarray(v))
      assert got.arrays["reacher"][k].dtype == v.dtype
    assert ckpt.restore(2, abstract_like(params)).arrays is None
    assert ckpt.restore(2, abstract_like(params), abstract_arrays=abstract_like(arrays)).arrays is None
    assert ckpt.restore_latest(abstract_like(params), abstract_arrays=abstract_like(arrays)).step == 2
