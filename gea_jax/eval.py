"""Closed-loop evaluation: the VLM policy acting in each embodiment's JAX environment.

For a batch of environments of one embodiment (vmapped reset/step), each decision builds the prompt
of `gea_jax.agent.prompt` on device from rolling buffers of the last k frames, states and action
tokens, samples the action's tokens one by one with the KV cache (greedy or sampled, constrained to
the embodiment's valid ids), decodes them with the RVQ decoder and steps the environment. The
per-step function is jitted once per embodiment; episodes end on success or at the time limit.
Environments are not reset during an evaluation, so each env's text (embodiment prompt + instruction)
is fixed: its KV cache is computed once before the loop (`text_prefix_cache`) and every step runs only
the frame part of the prompt on top of it (same actions as running the whole prompt, up to float rounding).
Returns success rate and mean return per embodiment and split; deterministic for a seed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gea_jax import sharding
from gea_jax.agent.context import AgentContext
from gea_jax.agent.policy import candidate_ids, decode_action_tokens, text_prefix_cache
from gea_jax.agent.prompt import assemble, embodiment_prompt, left_pad
from gea_jax.models.lora import merged_copy


@dataclasses.dataclass
class RolloutBuffers:
  """Per-env rolling history on device (pytree)."""

  images: jax.Array      # [N, F, H, W, 3] uint8
  states: jax.Array      # [N, F, Ds] f32 (normalized)
  hist_ids: jax.Array    # [N, F-1, T] int32 action tokens after each history frame
  frame_valid: jax.Array  # [N, F] bool


jax.tree_util.register_dataclass(RolloutBuffers, data_fields=["images", "states", "hist_ids", "frame_valid"],
                                 meta_fields=[])


def state_norm_arrays(ctx: AgentContext, e: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) padded to max_state_dim, so that (s - mean) / std equals ctx.normalize_state."""
  ds, D = ctx.specs[e].state_dim, ctx.max_state_dim
  mean, std = np.zeros(D, np.float32), np.ones(D, np.float32)
  st = ctx.state_stats[e]
  if ds and st is not None and ctx.normalization == "mean_std":
    mean[:ds] = st.mean
    std[:ds] = np.maximum(st.std, 1e-6)
  return mean, std


def text_prompts(ctx: AgentContext, e: int, instructions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded token ids + masks [N, text_len] for the embodiment prompt + each instruction."""
  L = ctx.layout
  rows = [left_pad(ctx.text_tokenizer.encode(f"{embodiment_prompt(ctx.specs[e])} {ins}"), L.text_len, L.pad_id)
          for ins in instructions]
  return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


def make_policy_step(ctx: AgentContext, e: int, *, greedy: bool, temperature: float = 1.0, decode_fn=None,
                     return_cache: bool = False):
  """A jittable fn(model, buffers, obs, text_ids, text_mask, key, mask_table, prefix_cache=None) -> (env action,
  tokens, logp, value, buffers'). ``mask_table`` (``vocab.mask_table``) is an argument, not a closed-over
  constant, so XLA does not try to constant-fold the masked softmax. ``prefix_cache``: the
  `text_prefix_cache` of ``text_ids``/``text_mask`` (then only the frame part of the prompt is run), or None
  (the whole prompt). ``decode_fn`` replaces `decode_action_tokens` (same signature; it is passed
  ``prefix_cache=`` only when one is given, and always ``candidate_ids=``, the action ids of
  ``ctx.vocab.mask_table`` (`policy.candidate_ids`; ``mask_table`` must allow no other id); e.g. the no-cache
  reference decoder of `gea_jax.agent.rollout`). ``return_cache``: also return the decoder's final KV cache
  (`Decoded.cache`; None for decoders without one) as a sixth output."""
  decode_fn = decode_fn or decode_action_tokens
  L, vocab = ctx.layout, ctx.vocab
  cand = candidate_ids(vocab.mask_table)  # logits only over the action ids
  mean, std = state_norm_arrays(ctx, e)
  spec = ctx.specs[e]
  ds = spec.state_dim
  n_tok = vocab.tokens_per_action(e)

  def push(buffers: RolloutBuffers, obs) -> RolloutBuffers:
    n = buffers.images.shape[0]
    img = obs["image"].astype(jnp.uint8)
    if img.shape[1:3] != buffers.images.shape[2:4]:
      img = jax.image.resize(img, (n, *buffers.images.shape[2:4], 3), "nearest").astype(jnp.uint8)
    st = jnp.zeros((n, ctx.max_state_dim), jnp.float32)
    if ds:
      st = st.at[:, :ds].set(obs["state"][:, :ds].astype(jnp.float32))
    st = (st - mean) / std
    roll = lambda buf, new: jnp.concatenate([buf[:, 1:], new[:, None]], axis=1)
    return RolloutBuffers(images=roll(buffers.images, img), states=roll(buffers.states, st),
                          hist_ids=buffers.hist_ids, frame_valid=roll(buffers.frame_valid, jnp.ones((n,), bool)))

  def step(model, buffers: RolloutBuffers, obs, text_ids, text_mask, key, mask_table, prefix_cache=None):
    buffers = push(buffers, obs)
    n = text_ids.shape[0]
    tok_valid = jnp.broadcast_to(jnp.arange(L.action_tokens) < n_tok, (n, L.action_tokens))
    prompt = assemble(L, jnp, text_ids, text_mask, buffers.frame_valid, buffers.hist_ids, tok_valid)
    prompt.update(image=buffers.images, state=buffers.states, embodiment_id=jnp.full((n,), e, jnp.int32))
    kw = {} if prefix_cache is None else {"prefix_cache": prefix_cache}
    dec = decode_fn(model, L, prompt, mask_table, tok_valid, key, greedy=greedy, temperature=temperature,
                    candidate_ids=cand, **kw)
    ids = jnp.where(tok_valid, dec.tokens, -1)
    actions = vocab.decode(ids, jnp.full((n,), e, jnp.int32))[:, 0]  # [N, max_dim]
    if spec.action_space.is_continuous:
      env_action = actions[:, :spec.action_space.dim]
    else:
      env_action = actions[:, 0].astype(jnp.int32)
    if L.history:
      new_hist = jnp.concatenate([buffers.hist_ids[:, 1:], dec.tokens[:, None]], axis=1)
      buffers = dataclasses.replace(buffers, hist_ids=new_hist)
    if return_cache:
      return env_action, dec.tokens, dec.logp, dec.value, buffers, getattr(dec, "cache", None)
    return env_action, dec.tokens, dec.logp, dec.value, buffers

  return step


def init_buffers(ctx: AgentContext, n: int) -> RolloutBuffers:
  L = ctx.layout
  h, w = ctx.image_size
  return RolloutBuffers(images=jnp.zeros((n, L.num_frames, h, w, 3), jnp.uint8),
                        states=jnp.zeros((n, L.num_frames, ctx.max_state_dim), jnp.float32),
                        hist_ids=jnp.full((n, L.history, L.action_tokens), L.pad_id, jnp.int32),
                        frame_valid=jnp.zeros((n, L.num_frames), bool))


def instructions_of(env, states, n: int) -> list[str]:
  """The instructions of ``n`` batched env states (one host transfer of their tasks: indexing every leaf of the
  device arrays row by row would compile a slice per row and shape)."""
  out = env.instruction(states)
  out = [out] if isinstance(out, str) else list(out)
  if len(out) != n:
    raise ValueError(f"instructions_of: {len(out)} instructions for {n} states")
  return out


@functools.lru_cache(maxsize=32)
def jitted_env_fns(env, split: str):
  """(reset, step) of ``env``, vmapped over episodes and jitted (cached per env and split): reset(keys) draws the
  split's tasks, step(states, actions) advances every episode."""
  reset = jax.jit(jax.vmap(functools.partial(env.reset, task_split=split)))
  step = jax.jit(jax.vmap(env.step))
  return reset, step


def evaluation_resets(env, split: str, seed: int, num_episodes: int):
  """The first states of `evaluate_embodiment`'s episodes for ``seed`` (to replay or inspect them)."""
  reset, _ = jitted_env_fns(env, split)
  return reset(jax.random.split(jax.random.fold_in(jax.random.key(seed), 0), num_episodes))


# every episode's key folded with the same data (a step number); jitted once for the process, not per evaluation
_fold_in_each = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))


def episode_rows(num_episodes: int) -> np.ndarray:
  """The evaluation episodes this process runs: all of them in a one-process run, else a contiguous share."""
  return np.array_split(np.arange(num_episodes), jax.process_count())[jax.process_index()]


def evaluate_embodiment(model, ctx: AgentContext, name: str, *, num_episodes: int, split: str, seed: int,
                        greedy: bool = True, perturb: tuple[int, int] | None = None,
                        text_prefix: bool = True, on_step=None) -> dict[str, Any]:
  """Runs ``num_episodes`` episodes in parallel; returns success_rate, mean_return, mean_length.

  Each episode draws from its own keys (its reset, its sampled tokens, its perturbation), so its course does not
  depend on the others: in a multi-host job each process runs its share of the episodes (`episode_rows`) on its own
  copy of the model, and the processes exchange their episodes' outcomes, so every process returns the figures a
  single process would.
  perturb=(start, length): replace the policy's actions by uniformly random ones for ``length`` steps
  from step ``start`` (the recovery test of GEA's online-RL lesson).
  text_prefix: cache the text part of the prompt once (default); False runs the whole prompt every step.
  on_step(t, states, action, live): called at every step with the env states the action was chosen in, the executed
  action and the bool mask of episodes still running (this process's episodes; for diagnostics, e.g.
  experiments/grid_failures.py).
  """
  from gea_jax.envs import registry
  env = registry.make(name)
  e = ctx.index(name)
  _, env_step = jitted_env_fns(env, split)
  rows = episode_rows(num_episodes)
  states = jax.tree.map(lambda x: x[rows], evaluation_resets(env, split, seed, num_episodes))
  row_keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1 << 30), num_episodes)[rows]
  # the parameters are fixed here: fold the LoRA adapters once (the model is untouched); in a multi-host job on a
  # whole copy on this process's first device (every process takes part in the copy, even one without episodes)
  model = merged_copy(sharding.process_local_copy(model))
  outcome = [np.zeros(0, bool), np.zeros(0, np.float64), np.zeros(0, np.int64)]
  if len(rows):
    outcome = _run_episodes(model, ctx, env, env_step, e, states, row_keys, greedy=greedy, perturb=perturb,
                            text_prefix=text_prefix, on_step=on_step)
  success, ret, length = gather_episodes(f"{name}/{split}", *outcome)
  return {"success_rate": float(success.mean()), "mean_return": float(ret.mean()),
          "mean_length": float(length.mean()), "episodes": int(num_episodes)}


def _run_episodes(model, ctx: AgentContext, env, env_step, e: int, states, row_keys, *, greedy: bool, perturb,
                  text_prefix: bool, on_step) -> list[np.ndarray]:
  """`evaluate_embodiment`'s loop over this process's episodes -> [success, return, length] per episode."""
  n = len(row_keys)
  text_ids, text_mask = text_prompts(ctx, e, instructions_of(env, states, n))
  text_ids, text_mask = jnp.asarray(text_ids), jnp.asarray(text_mask)
  policy = nnx.jit(make_policy_step(ctx, e, greedy=greedy))
  prefix = None
  if text_prefix:  # no resets during the evaluation: the text (and its KV cache) is fixed
    L = ctx.layout
    prefix = nnx.jit(lambda m, ids, mask: text_prefix_cache(m, L, ids, mask))(model, text_ids, text_mask)
  buffers = init_buffers(ctx, n)
  spec = env.spec
  done = np.zeros(n, bool)
  success = np.zeros(n, bool)
  ret = np.zeros(n, np.float64)
  length = np.zeros(n, np.int64)
  for t in range(spec.max_episode_steps):
    k = _fold_in_each(row_keys, t + 1)  # a key per episode
    action, _, _, _, buffers = policy(model, buffers, states.obs, text_ids, text_mask, k, ctx.vocab.mask_table,
                                      prefix)
    if perturb is not None and perturb[0] <= t < perturb[0] + perturb[1]:
      action = _random_actions(spec, _fold_in_each(k, 7))
    if on_step is not None:
      on_step(t, states, action, ~done)
    states = env_step(states, action)
    r, d, s = (np.asarray(x) for x in jax.device_get((states.reward, states.done, states.success)))
    live = ~done
    ret += np.where(live, r, 0.0)
    length += live
    success |= live & s
    done |= d
    if done.all():
      break
  return [success, ret, length]


def gather_episodes(name: str, *arrays: np.ndarray) -> list[np.ndarray]:
  """Each per-episode array over all processes' episodes, in episode order (`episode_rows`); exact (host bytes)."""
  if jax.process_count() == 1:
    return list(arrays)
  import io

  from gea_jax.distributed import allgather_bytes
  buf = io.BytesIO()
  np.savez(buf, *arrays)
  parts = [np.load(io.BytesIO(b)) for b in allgather_bytes(f"eval/{name}", buf.getvalue())]
  return [np.concatenate([p[f"arr_{i}"] for p in parts]) for i in range(len(arrays))]


def _random_actions(spec, keys):
  """A uniformly random action per episode, each from its own key."""
  a = spec.action_space
  if a.is_continuous:
    draw = lambda k: jax.random.uniform(k, (a.dim,), minval=jnp.asarray(a.low), maxval=jnp.asarray(a.high))
  else:
    draw = lambda k: jax.random.randint(k, (), 0, a.num_actions)
  return jax.vmap(draw)(keys)


DECODING = ("greedy", "sampled", "greedy_continuous")


def is_greedy(decoding: str | bool, spec) -> bool:
  """Whether an embodiment is decoded greedily under ``decoding``.

  "greedy_continuous": greedy for continuous actions, sampled (temperature 1) for discrete ones. A greedy
  policy in a deterministic grid repeats the same action in a state that action does not change (e.g.
  walking into a wall) until the episode times out; sampling leaves such loops. Booleans mean greedy /
  sampled for every embodiment.
  """
  if isinstance(decoding, bool):
    return decoding
  if decoding not in DECODING:
    raise ValueError(f"eval decoding: expected one of {DECODING} (or a bool), got {decoding!r}")
  if decoding == "greedy_continuous":
    return bool(spec.action_space.is_continuous)
  return decoding == "greedy"


def evaluate(model, ctx: AgentContext, embodiments: Sequence[str], *, num_episodes: int, splits: Sequence[str],
             seed: int = 0, greedy: bool | str = True, perturb: tuple[int, int] | None = None) -> list[dict[str, Any]]:
  """Rows {embodiment, split, success_rate, mean_return, ...} for every embodiment x applicable split.

  ``greedy``: a bool, or one of ``DECODING`` (see ``is_greedy``). ``perturb``: as in ``evaluate_embodiment``
  (random actions for a few steps mid-episode).
  """
  rows = []
  for name in embodiments:
    g = is_greedy(greedy, ctx.specs[ctx.index(name)])
    for split in splits:
      if split == "heldout_combo" and not name.startswith("grid"):
        continue
      r = evaluate_embodiment(model, ctx, name, num_episodes=num_episodes, split=split, seed=seed, greedy=g,
                              perturb=perturb)
      rows.append({"embodiment": name, "split": split, "decoding": "greedy" if g else "sampled", **r})
  return rows
