"""Stage 1 SFT: loss mask, sharded step equality, exact resume, SIGTERM, NaN guard, corrupt checkpoint,
deterministic evaluation, and a tiny run that lowers the loss and writes the report.

The datasets here are small synthetic episodes written with the real TFDS builder for the real
embodiment specs (the SFT machinery is under test, not the experts), and the RVQ artifact is an
untrained tokenizer with codebooks seeded from those actions.
"""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny_agent_config import EMBODIMENTS, tiny_config

from data_pipelines.rlds_builder import build_dataset
from gea_jax import sharding
from gea_jax.agent.context import load_context
from gea_jax.agent.sequence import fill_action_ids
from gea_jax.envs import registry
from gea_jax.tokenizers.action_vocab import build_vocab
from gea_jax.tokenizers.artifact import save_artifact
from gea_jax.tokenizers.rvq import ActionTokenizer, RVQConfig
from gea_jax.train import sft
from gea_jax.train.loop_utils import NonFiniteLossError


def _episodes(spec, rng, n, T=12):
  out = []
  for i in range(n):
    a = spec.action_space
    task = i % 3  # the action is a function of the instruction, so SFT has something to learn
    if a.is_continuous:
      target = np.linspace(a.low, a.high, 3)[task]
      action = np.repeat(target[None], T, 0).astype(np.float32)
    else:
      action = np.full((T, 1), task, np.int32)
    h, w, _ = spec.image_shape
    out.append(dict(
        image=rng.integers(0, 255, size=(T, h, w, 3), dtype=np.uint8),
        state=rng.normal(size=(T, spec.state_dim)).astype(np.float32), action=action,
        reward=np.zeros(T, np.float32), discount=np.ones(T, np.float32),
        is_first=np.arange(T) == 0, is_last=np.arange(T) == T - 1, is_terminal=np.arange(T) == T - 1,
        instruction=f"task number {task}", embodiment=spec.name, task="synthetic", seed=i, expert="random",
        success=True, **({} if a.is_continuous else {  # own stream: the other arrays stay as they were
            "target_point": np.random.default_rng([7, i]).uniform(0, 1, (T, 2)).astype(np.float32)})))
  return out


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("sft")
  data_dir = str(root / "data")
  rng = np.random.default_rng(0)
  specs = [registry.make(n).spec for n in EMBODIMENTS]
  for spec in specs:
    build_dataset(data_dir, spec, lambda split, n, seed, spec=spec: iter(_episodes(spec, rng, n)),
                  {"train": 6}, progress=False)
  cfg = RVQConfig(num_levels=2, codebook_size=16, latent_dim=4, hidden=16, num_layers=1)
  tok = ActionTokenizer(cfg, specs, rngs=nnx.Rngs(0))
  acts = jnp.asarray(rng.uniform(-1, 1, size=(64, 1, tok.max_dim)), jnp.float32)
  tok.init_codebooks(acts, jnp.zeros((64,), jnp.int32), jax.random.key(0))
  from gea_jax.agent.context import resolve_text_tokenizer
  from gea_jax.interop.tokenizers import load_text_tokenizer
  vocab_size = load_text_tokenizer(resolve_text_tokenizer("smollm2")).vocab_size
  vocab = build_vocab(tok, llm_vocab_size=vocab_size)
  artifact = str(root / "artifact")
  save_artifact(artifact, tok, vocab)
  return dict(data_dir=data_dir, artifact=artifact, root=root)


def _losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "sft", "metrics.jsonl"))]
  return {r["step"]: r["sft/loss"] for r in rows if "sft/loss" in r}


def _params(model):
  return {str(k): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def test_loss_mask_covers_exactly_the_action_tokens(assets):
  config = tiny_config()
  ctx = load_context(config, assets["artifact"], assets["data_dir"], EMBODIMENTS)
  it = sft.make_iterator(config, ctx, assets["data_dir"], EMBODIMENTS)
  batch = next(it)
  slots = ctx.layout.slots()
  mask = batch["loss_mask"]
  assert set(np.nonzero(mask.any(0))[0]) <= set(slots["logit_pos"])
  for row in range(mask.shape[0]):
    e = int(batch["embodiment_id"][row])
    assert mask[row].sum() == ctx.vocab.tokens_per_action(e)
  filled = fill_action_ids(ctx.vocab, ctx.layout, {k: jnp.asarray(v) for k, v in batch.items()
                                                   if k in sft.MODEL_KEYS})
  tgt = np.asarray(filled["targets"])[:, slots["logit_pos"]]
  ids = np.asarray(filled["input_ids"])[:, slots["target_pos"]]
  used = mask[:, slots["logit_pos"]] > 0
  np.testing.assert_array_equal(tgt[used], ids[used])  # next-token targets are the action ids
  lo, n = ctx.vocab.first_id, ctx.vocab.num_ids
  assert ((tgt[used] >= lo) & (tgt[used] < lo + n)).all()


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 4, 1)])
def test_one_step_equals_single_device(assets, shape):
  config = tiny_config()
  ctx = load_context(config, assets["artifact"], assets["data_dir"], EMBODIMENTS)
  batch = next(sft.make_iterator(config, ctx, assets["data_dir"], EMBODIMENTS))
  results = []
  for mesh in (sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]), sharding.make_mesh(shape)):
    mesh, rules = sft.mesh_and_rules(config, mesh)
    model, opt, wrt = sft.setup_model(config, ctx, mesh, rules)
    step = sft.TrainStep(ctx, model, opt, wrt, mesh, grounding_weight=sft.grounding_weight(config))
    with sharding.use_mesh(mesh, rules):
      out = step(sft.device_batch(batch, mesh))
    step.sync()
    results.append((float(out["loss"]), _params(model)))
  (l1, p1), (l2, p2) = results
  assert abs(l1 - l2) < 1e-5
  for k in p1:
    np.testing.assert_allclose(p1[k], p2[k], atol=1e-5, err_msg=k)


def test_resume_is_exact_and_corrupt_checkpoint_falls_back(assets, tmp_path):
  config = tiny_config()
  full = tmp_path / "full"
  res = sft.train(config, str(full), artifact_dir=assets["artifact"], data_dir=assets["data_dir"])
  assert res.steps == 6
  # "killed" after step 3: a run directory holding only the step-3 checkpoint, resumed to 6.
  part = tmp_path / "part"
  shutil.copytree(full, part)
  shutil.rmtree(part / "sft" / "checkpoints" / "6")
  res2 = sft.train(config, str(part), artifact_dir=assets["artifact"], data_dir=assets["data_dir"])
  assert res2.steps == 6
  for k, v in _params(res.model).items():
    np.testing.assert_array_equal(v, _params(res2.model)[k], err_msg=k)
  l_full, l_part = _losses(full), _losses(part)
  assert all(l_full[s] == l_part[s] for s in (4, 5, 6))
  # A damaged newest checkpoint: the run logs it, falls back to step 3 and finishes again.
  corrupt = tmp_path / "corrupt"
  shutil.copytree(full, corrupt)
  for f in (corrupt / "sft" / "checkpoints" / "6" / "params").rglob("*"):
    if f.is_file() and f.stat().st_size > 1000:
      f.write_bytes(f.read_bytes()[:100])
  res3 = sft.train(config, str(corrupt), artifact_dir=assets["artifact"], data_dir=assets["data_dir"])
  assert res3.steps == 6
  assert (corrupt / "sft" / "checkpoints_corrupt").exists()
  for k, v in _params(res.model).items():
    np.testing.assert_array_equal(v, _params(res3.model)[k], err_msg=k)


def test_sigterm_saves_and_stops(assets, tmp_path):
  config = tiny_config()
  config.sft.eval_every = 2

  def send_sigterm(model, ctx, step):
    os.kill(os.getpid(), signal.SIGTERM)
    return {}

  res = sft.train(config, str(tmp_path), artifact_dir=assets["artifact"], data_dir=assets["data_dir"],
                  eval_fn=send_sigterm)
  assert res.steps == 2 and res.preempted
  assert (tmp_path / "sft" / "checkpoints" / "2").is_dir()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(assets, tmp_path):
  config = tiny_config()
  config.sft.eval_every = 3

  def poison(model, ctx, step):
    k = model.state_proj.kernel
    k.set_value(jnp.full_like(k.get_value(), jnp.nan))
    return {}

  with pytest.raises(NonFiniteLossError, match="step 4.*last good checkpoint is step 3"):
    sft.train(config, str(tmp_path), artifact_dir=assets["artifact"], data_dir=assets["data_dir"], eval_fn=poison)
  steps = sorted(int(p.name) for p in (tmp_path / "sft" / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [3]


def test_evaluation_is_deterministic(assets):
  from gea_jax.agent.model import build_agent
  from gea_jax.eval import evaluate_embodiment
  config = tiny_config()
  ctx = load_context(config, assets["artifact"], assets["data_dir"], EMBODIMENTS)
  model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size)
  runs = [evaluate_embodiment(model, ctx, "grid_goto", num_episodes=4, split="heldout_seed", seed=3, greedy=False)
          for _ in range(2)]
  assert runs[0] == runs[1]
  assert 0.0 <= runs[0]["success_rate"] <= 1.0 and runs[0]["mean_length"] > 0
  # the per-step hook sees each step's states before the action, the executed action and the live mask; the run's
  # result is unchanged, and replaying the recorded actions from the same resets reproduces its successes
  seen = []
  hooked = evaluate_embodiment(
      model, ctx, "grid_goto", num_episodes=4, split="heldout_seed", seed=3, greedy=False,
      on_step=lambda t, states, action, live: seen.append((t, np.asarray(states.step), np.asarray(action), live.copy(),
                                                           np.asarray(states.inner["agent"].position))))
  assert hooked == runs[0]
  assert [t for t, *_ in seen] == list(range(len(seen)))
  assert all((steps[live] == t).all() for t, steps, _, live, _ in seen)
  assert sum(int(live.sum()) for _, _, _, live, _ in seen) == round(4 * runs[0]["mean_length"])
  from gea_jax.envs import registry
  from gea_jax.eval import evaluation_resets, jitted_env_fns
  env = registry.make("grid_goto")
  _, step = jitted_env_fns(env, "heldout_seed")
  states = evaluation_resets(env, "heldout_seed", 3, 4)
  success, moved = np.zeros(4, bool), 0
  for _, _, action, live, position in seen:  # each step starts where the recorded actions lead
    np.testing.assert_array_equal(np.asarray(states.inner["agent"].position)[live], position[live])
    states = step(states, jnp.asarray(action))
    moved += int((np.asarray(states.inner["agent"].position) != position).any(-1)[live].sum())
    success |= live & np.asarray(states.success)
  assert moved > 0 and success.mean() == runs[0]["success_rate"]


def test_tiny_sft_lowers_the_loss_and_writes_the_report(assets, tmp_path):
  from gea_jax.reporting import write_report
  config = tiny_config()
  config.sft.steps = 30
  config.sft.log_every = 1
  config.sft.checkpoint_every = 30
  config.sft.lr = 3e-3
  res = sft.train(config, str(tmp_path), artifact_dir=assets["artifact"], data_dir=assets["data_dir"])
  losses = _losses(tmp_path)
  first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (28, 29, 30)])
  assert last < 0.8 * first, (first, last)  # measured: 2.44 -> 1.49
  paths = write_report(tmp_path, "tiny SFT", tables={"final": [res.final_metrics]}, curves=res.curves,
                       summary={"steps": res.steps})
  report = json.loads((tmp_path / "report.json").read_text())
  assert report["summary"]["steps"] == 30 and "sft/loss" in report["curves"]
  assert (tmp_path / "report.md").read_text().count("|") > 4 and paths


def test_state_mlp_token_and_its_validation(assets):
  """``model.state_hidden_dim`` > 0: each frame's state slot holds state_proj(gelu(state_mlp(state)))."""
  from gea_jax.agent.model import build_agent
  from gea_jax.agent.prompt import STATE_SLOT
  from gea_jax.config_validation import ConfigError
  config = tiny_config()
  config.model.state_hidden_dim = 24
  ctx = load_context(config, assets["artifact"], assets["data_dir"], EMBODIMENTS)
  model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size)
  assert model.state_mlp.kernel.get_value().shape == (ctx.max_state_dim, 24)
  assert model.state_proj.kernel.get_value().shape == (24, config.model.llm.hidden_size)
  L = ctx.layout
  b, f = 2, L.num_frames
  states = jax.random.normal(jax.random.key(0), (b, f, ctx.max_state_dim))
  images = jnp.zeros((b, f, 16, 16, 3), jnp.uint8)
  x = model.embed(jnp.zeros((b, L.seq_len), jnp.int32), images, states)
  kind, frame = L.slots()["kind"], L.slots()["frame_index"]
  pos = np.nonzero(kind == STATE_SLOT)[0]
  assert len(pos) == f
  expected = model.state_proj(jax.nn.gelu(model.state_mlp(states)))
  np.testing.assert_allclose(np.asarray(x[:, pos]), np.asarray(expected[:, frame[pos]]), rtol=1e-5, atol=1e-6)
  config.model.state_hidden_dim = 0  # the linear state token
  assert build_agent(config.model, L, ctx.max_state_dim, ctx.vocab.total_vocab_size).state_mlp is None
  config.model.state_hidden_dim = -1
  with pytest.raises(ConfigError, match="model.state_hidden_dim"):
    sft.validate_model(config)


def test_text_film_validation_and_missing_text_are_named(assets):
  """``model.vision.text_film`` needs the tiny CNN (a ConfigError naming the key otherwise), and the frame part on a
  text cache without the text ids is an error naming what to pass."""
  from gea_jax.agent.model import build_agent
  from gea_jax.config_validation import ConfigError
  config = tiny_config()
  config.model.vision.text_film = True
  sft.validate_model(config)
  ctx = load_context(config, assets["artifact"], assets["data_dir"], EMBODIMENTS)
  model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size)
  L = ctx.layout
  b, f, s = 2, L.num_frames, L.text_len
  ids = jnp.zeros((b, L.prompt_len - s), jnp.int32)
  with pytest.raises(ValueError, match="pass text_ids and text_mask"):
    model.forward(ids, jnp.zeros((b, f, 16, 16, 3), jnp.uint8), jnp.zeros((b, f, ctx.max_state_dim)),
                  jnp.ones_like(ids), jnp.zeros_like(ids), cache=model.llm.init_cache(b, L.seq_len), offset=s)
  config.model.vision.encoder = "efficientnet_lite0"
  with pytest.raises(ConfigError, match="model.vision.text_film"):
    sft.validate_model(config)


def test_grounding_loss_matches_a_reference_and_adds_to_the_action_loss(assets):
  """The grounding head's loss: sigmoid cross-entropy over each labelled frame's image tokens, the positive being the
  token whose pool cell holds ``target_point``; frames without a point (reacher's, padding) add nothing; sft_loss
  adds ``grounding_weight`` times it; the weight without the head is a ConfigError naming the key."""
  from gea_jax.agent.grounding import grounding_loss, image_slot_positions, token_labels
  from gea_jax.agent.model import build_agent
  from gea_jax.agent.policy import sft_loss
  from gea_jax.config_validation import ConfigError
  config = tiny_config()
  ctx = load_context(config, assets["artifact"], assets["data_dir"], EMBODIMENTS)
  L = ctx.layout
  model = build_agent(config.model, L, ctx.max_state_dim, ctx.vocab.total_vocab_size)
  raw = next(sft.make_iterator(config, ctx, assets["data_dir"], EMBODIMENTS))
  batch = fill_action_ids(ctx.vocab, L, {k: jnp.asarray(v) for k, v in sft.model_arrays(raw).items()})
  tp = np.asarray(batch["target_point"])
  grid_rows = np.asarray(batch["embodiment_id"]) == ctx.index("grid_goto")
  assert grid_rows.any() and (~grid_rows).any()
  assert (tp[~grid_rows] == -1).all() and (tp[grid_rows][np.asarray(raw["frame_valid"])[grid_rows]] >= 0).all()

  # labels: row-major pool cells
  gh, gw = model.vlm.pool_grid
  labels, has = token_labels(jnp.asarray([[0.0, 0.0], [0.99, 0.99], [0.3, 0.8], [-1.0, -1.0]]), (gh, gw))
  want = [0, gh * gw - 1, int(0.3 * gh) * gw + int(0.8 * gw)]
  np.testing.assert_array_equal(np.asarray(labels[:3]).argmax(-1), want)
  assert np.asarray(has).tolist() == [True, True, True, False] and not np.asarray(labels[3]).any()

  hidden = model.forward(batch["input_ids"], batch["image"], batch["state"], batch["attention_mask"],
                         batch["positions"]).hidden_states
  loss, acc = grounding_loss(model, L, hidden, batch["target_point"])
  pos = image_slot_positions(L)
  logits = np.asarray(model.grounding_head(hidden[:, pos]))[..., 0].astype(np.float64)  # [b, F, T]
  total, frames, hits = 0.0, 0, 0
  for b in range(tp.shape[0]):
    for f in range(L.num_frames):
      if (tp[b, f] < 0).any():
        continue
      k = int(tp[b, f, 0] * gh) * gw + int(tp[b, f, 1] * gw)
      y = np.eye(gh * gw)[k]
      z = logits[b, f]
      total += np.sum(np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - y * z)
      frames += 1
      hits += int(z.argmax() == k)
  assert frames > 0
  np.testing.assert_allclose(float(loss), total / frames, rtol=1e-5)
  np.testing.assert_allclose(float(acc), hits / frames, rtol=1e-6)

  mt = jnp.asarray(ctx.vocab.mask_table)
  plain, m0 = sft_loss(model, L, batch, mt)
  both, m1 = sft_loss(model, L, batch, mt, grounding_weight=0.25)
  np.testing.assert_allclose(float(both), float(plain) + 0.25 * float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(m1["action_loss"]), float(plain), rtol=1e-6)
  assert "grounding_loss" not in m0
  no_label = {**batch, "target_point": jnp.full_like(batch["target_point"], -1.0)}
  assert float(grounding_loss(model, L, hidden, no_label["target_point"])[0]) == 0.0

  config.model.grounding_head = False
  with pytest.raises(ConfigError, match="sft.grounding_weight"):
    sft.validate_sft(config)
  assert build_agent(config.model, L, ctx.max_state_dim, ctx.vocab.total_vocab_size).grounding_head is None
  config.sft.grounding_weight = 0.0
  sft.validate_sft(config)
