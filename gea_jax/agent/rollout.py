"""Jitted multi-step rollouts of the VLM policy for PPO, built on `gea_jax.eval.make_policy_step`.

`make_collector(ctx, e, env, T)` returns ``collect(model, pool, num_envs, key, mask_table) -> (Trajectory,
bootstrap value)``: a `lax.scan` over ``T`` env steps of N environments of one embodiment. Each step builds
the prompt on device, samples the action's tokens one by one with the KV cache (`decode_action_tokens`),
steps the env, and auto-resets finished episodes. Instructions are host-side text, so resets draw from a
*reset pool*: ``P`` reset states sampled and tokenized on the host before the call (`make_reset_pool`); env
``i`` takes the next pool entry when its episode ends. The trajectory stores what the update needs to
rebuild the full teacher-forced sequence (prompt + the sampled action ids) with `prompt.assemble`.

By default the KV cache of the prompt's text part (`text_prefix_cache`) is carried in the scan: it is
computed for all envs before the scan and recomputed for the reset rows only (`refresh_prefix_rows`, in
chunks of a few rows) on the steps where some env was reset, so most steps run only the frame part of the
prompt plus the action tokens. The carried cache holds the buffers the last decision wrote its frame and action
slots into (`reuse_prefix_buffers`: not valid, overwritten by the next decision), so XLA writes them in place.
``prefix_cache=False`` runs the whole prompt every step (the per-step cache). The parameters are fixed within a
call, so by default the LoRA adapters are folded into a copy of the kernels once at its start (``fold_lora``).

``make_collector(..., continue_episodes=True)`` gives ``collect(model, pool, num_envs, key, mask_table, start) ->
(Trajectory, bootstrap value, Episodes)``: the envs start from ``start`` (the running episodes a previous call
returned, or `initial_episodes` of a pool) instead of ``pool[:N]``, and the episodes still running at the end come
back, so that successive calls (PPO iterations) continue them: episodes longer than one call's ``T`` steps are
then seen to their end, as in Brax's PPO. The text cache is recomputed at the start of every call (the
parameters change between calls).

Sharding: inside `gea_jax.sharding.use_mesh` the scan's carry and each step's outputs are pinned to the "envs"
logical axis (the mesh's batch axes by default), so each device steps and decodes its own slice of the envs.
One key per step samples every env's tokens (`jax.random.categorical` over the [N, C] logits); jax's
partitionable threefry (the default) draws the same numbers whatever the sharding, so the samples do not
depend on the mesh.

`decode_without_cache` is the reference decoder (recompute the whole context for every action token),
used by the KV-cache tests and the rollout benchmark.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from gea_jax.agent.context import AgentContext
from gea_jax.agent.policy import Decoded, reuse_prefix_buffers, sample_token, text_prefix_cache
from gea_jax.agent.prompt import PromptLayout, assemble
from gea_jax.eval import init_buffers, instructions_of, make_policy_step, text_prompts
from gea_jax.models.kv_cache import KVCache
from gea_jax.models.lora import merged_copy
from gea_jax.sharding import constrain


@struct.dataclass
class ResetPool:
  """``P`` freshly reset env states with their tokenized instructions (leading axis P)."""

  states: object          # EnvState [P, ...]
  text_ids: jax.Array     # [P, text_len]
  text_mask: jax.Array    # [P, text_len]


@struct.dataclass
class Episodes:
  """The running episodes of ``N`` envs between collector calls (leading axis N on every leaf)."""

  env_state: object       # EnvState [N, ...]
  buffers: object         # RolloutBuffers [N, ...]: the frame/action history of the running episodes
  text_ids: jax.Array     # [N, text_len]
  text_mask: jax.Array    # [N, text_len]


def initial_episodes(ctx: AgentContext, pool: ResetPool, n: int) -> Episodes:
  """``N`` fresh episodes: the first ``N`` entries of ``pool`` with empty buffers."""
  return Episodes(env_state=_take(pool.states, jnp.arange(n)), buffers=init_buffers(ctx, n),
                  text_ids=pool.text_ids[:n], text_mask=pool.text_mask[:n])


@struct.dataclass
class Trajectory:
  """Time-major ``[T, N, ...]`` data of one embodiment's rollout."""

  images: jax.Array       # [T, N, F, H, W, 3] uint8 frames of the prompt
  states: jax.Array       # [T, N, F, Ds] normalized states
  frame_valid: jax.Array  # [T, N, F] bool
  hist_ids: jax.Array     # [T, N, F-1, Ta] history action ids in the prompt
  text_ids: jax.Array     # [T, N, text_len]
  text_mask: jax.Array    # [T, N, text_len]
  tokens: jax.Array       # [T, N, Ta] sampled action ids (pad where unused)
  logp: jax.Array         # [T, N] summed log-prob of the sampled tokens
  value: jax.Array        # [T, N]
  reward: jax.Array       # [T, N]
  termination: jax.Array  # [T, N] episode ended by success (no bootstrap)
  truncation: jax.Array   # [T, N] episode ended by the time limit
  success: jax.Array      # [T, N]
  # a privileged critic's features (`make_collector(critic_features=)`; [T, N, 0] without one): of the state each
  # action was taken in, and of the state the next action is taken in (after any auto-reset; [-1] bootstraps)
  critic_obs: jax.Array       # [T, N, Dc]
  next_critic_obs: jax.Array  # [T, N, Dc]


def make_reset_pool(env, ctx: AgentContext, e: int, key: jax.Array, size: int, split: str = "train") -> ResetPool:
  """Host side: ``size`` reset states and their tokenized instructions."""
  reset = _jitted_reset(env, split)
  states = reset(jax.random.split(key, size))
  ids, mask = text_prompts(ctx, e, instructions_of(env, states, size))
  return ResetPool(states=states, text_ids=jnp.asarray(ids), text_mask=jnp.asarray(mask))


@functools.lru_cache(maxsize=32)
def _jitted_reset(env, split: str):
  return jax.jit(jax.vmap(functools.partial(env.reset, task_split=split)))


def _on_envs(tree, n: int):
  """Pin every leaf with a leading env axis of ``n`` to the "envs" sharding (a no-op outside ``use_mesh``)."""
  def one(x):
    if getattr(x, "ndim", 0) and x.shape[0] == n:
      return constrain(x, ("envs",) + (None,) * (x.ndim - 1))
    return x
  return jax.tree.map(one, tree)


def _take(tree, idx):
  return jax.tree.map(lambda x: x[idx], tree)


def _where_rows(done, new, old):
  def one(a, b):
    return jnp.where(done.reshape(done.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(one, new, old)


def _set_cache_rows(cache: KVCache, rows, sub: KVCache) -> KVCache:
  """``cache`` with rows ``rows`` [r] replaced by the r rows of ``sub`` (same slots filled; out-of-range indices are
  dropped)."""
  put = lambda a, b: a.at[rows].set(b.astype(a.dtype), mode="drop")
  return cache.replace(keys=tuple(map(put, cache.keys, sub.keys)), values=tuple(map(put, cache.values, sub.values)),
                       valid=put(cache.valid, sub.valid), next_position=put(cache.next_position, sub.next_position))


def refresh_prefix_rows(model, layout: PromptLayout, prefix: KVCache, done, text_ids, text_mask,
                        chunk: int) -> KVCache:
  """Recompute the text-prefix cache of the rows where ``done`` (their text changed), ``chunk`` rows per LLM pass.

  The rows to refresh are gathered into batches of ``chunk`` (a `lax.while_loop`: no pass when no row is done,
  ceil(count / chunk) passes otherwise), so a step where one of N envs reset costs a prefix pass over ``chunk``
  rows, not N. Rows are independent in the LLM, so this equals recomputing all rows and keeping the done ones.
  """
  n = done.shape[0]
  chunk = max(1, min(int(chunk), n))
  count = jnp.sum(done.astype(jnp.int32))
  order = jnp.argsort((~done).astype(jnp.int32), stable=True).astype(jnp.int32)  # done rows first, in row order
  order = jnp.concatenate([order, jnp.zeros((chunk,), jnp.int32)])

  def body(state):
    i, cache = state
    k = i * chunk + jnp.arange(chunk)
    rows = jax.lax.dynamic_slice(order, (i * chunk,), (chunk,))
    sub = text_prefix_cache(model, layout, text_ids[rows], text_mask[rows])
    return i + 1, _set_cache_rows(cache, jnp.where(k < count, rows, n), sub)  # index n: dropped

  return jax.lax.while_loop(lambda st: st[0] * chunk < count, body, (jnp.zeros((), jnp.int32), prefix))[1]


def make_collector(ctx: AgentContext, e: int, env, num_steps: int, *, greedy: bool = False,
                   temperature: float = 1.0, decode_fn=None, prefix_cache: bool | None = None,
                   prefix_chunk: int | None = None, continue_episodes: bool = False, fold_lora: bool = True,
                   critic_features=None):
  """``collect(model, pool, num_envs, key, mask_table) -> (Trajectory, bootstrap_value [N])``.

  ``continue_episodes``: ``collect(model, pool, num_envs, key, mask_table, start) -> (Trajectory, bootstrap value,
  Episodes)``, starting from the running episodes ``start`` and returning those running at the end (see the module
  docstring).

  Envs start from ``pool[:N]``; the k-th episode end (over all envs, in row order per step) takes
  ``pool[N + k mod (P - N)]``. Not jitted here: wrap it (the trainer jits it over split model state).
  ``decode_fn`` replaces the KV-cached decoder (e.g. `decode_without_cache`, for the benchmark).
  ``prefix_cache``: carry the text's KV cache across steps (see the module docstring); default True with
  the built-in decoder, False with a ``decode_fn`` (which must then accept ``prefix_cache=`` if set True).
  ``prefix_chunk``: rows per prefix recomputation after resets (`refresh_prefix_rows`; default ceil(N / 4)).
  ``fold_lora``: decode with the LoRA adapters folded into a copy of the kernels, once per call
  (`gea_jax.models.lora.merged_copy`; the parameters are fixed within a call): the same policy up to float
  rounding, one matmul per projection instead of three; costs a second copy of the adapted kernels.
  ``critic_features``: ``fn(state) -> [Dc]`` (`gea_jax.rl.privileged_critic.privileged_features`): the trajectory's
  ``critic_obs`` / ``next_critic_obs`` hold it for every step (empty ``[T, N, 0]`` without it).
  """
  policy = make_policy_step(ctx, e, greedy=greedy, temperature=temperature, decode_fn=decode_fn, return_cache=True)
  spec = ctx.specs[e]
  L = ctx.layout
  use_prefix = decode_fn is None if prefix_cache is None else bool(prefix_cache)

  def features(env_state):  # [N, Dc]
    if critic_features is None:
      return jnp.zeros((env_state.step.shape[0], 0), jnp.float32)
    return jax.vmap(critic_features)(env_state)

  def collect(model, pool: ResetPool, num_envs: int, key, mask_table, start: Episodes | None = None):
    n = num_envs
    p = pool.text_ids.shape[0]
    if p <= n:
      raise ValueError(f"reset pool of {p} states must be larger than num_envs={n}")
    if continue_episodes and start is None:
      raise ValueError("collect: continue_episodes=True needs start= (the previous call's Episodes, or "
                       "initial_episodes(ctx, pool, num_envs))")
    if start is None:
      start = initial_episodes(ctx, pool, n)
    chunk = prefix_chunk or -(-n // 4)
    if fold_lora:
      model = merged_copy(model)
    # the text's KV cache (None without the prefix path: an empty pytree in the carry)
    prefix0 = text_prefix_cache(model, L, start.text_ids, start.text_mask) if use_prefix else None
    carry0 = _on_envs((start.env_state, start.buffers, start.text_ids, start.text_mask, jnp.zeros((), jnp.int32),
                       prefix0, features(start.env_state)), n)
    fresh = _on_envs(init_buffers(ctx, n), n)

    def step(carry, k):
      env_state, buffers, text_ids, text_mask, used, prefix, critic_obs = carry  # critic_obs: env_state's features
      action, tokens, logp, value, new_buffers, used_cache = policy(model, buffers, env_state.obs, text_ids,
                                                                    text_mask, k, mask_table, prefix)
      if use_prefix and used_cache is not None:  # carry the written buffers: in-place slot writes, no copy
        prefix = reuse_prefix_buffers(prefix, used_cache)
      nxt = jax.vmap(env.step)(env_state, action)
      done = nxt.done
      out = Trajectory(images=new_buffers.images, states=new_buffers.states, frame_valid=new_buffers.frame_valid,
                       hist_ids=buffers.hist_ids, text_ids=text_ids, text_mask=text_mask, tokens=tokens, logp=logp,
                       value=value, reward=nxt.reward, termination=nxt.terminal & done,
                       truncation=done & ~nxt.terminal, success=nxt.success & done, critic_obs=critic_obs,
                       next_critic_obs=critic_obs)
      # auto-reset: finished rows take the next pool entries
      rank = jnp.cumsum(done.astype(jnp.int32)) - 1
      idx = n + (used + rank) % (p - n)
      env_state = _where_rows(done, _take(pool.states, idx), nxt)
      text_ids = jnp.where(done[:, None], pool.text_ids[idx], text_ids)
      text_mask = jnp.where(done[:, None], pool.text_mask[idx], text_mask)
      new_buffers = _where_rows(done, fresh, new_buffers)
      next_critic_obs = features(env_state)  # the next step's: carried, computed once per step
      out = out.replace(next_critic_obs=next_critic_obs)
      if use_prefix:  # reset rows have a new text: recompute their caches (only theirs, only when some env reset)
        prefix = refresh_prefix_rows(model, L, prefix, done, text_ids, text_mask, chunk)
      return (_on_envs((env_state, new_buffers, text_ids, text_mask, used + done.sum(), prefix, next_critic_obs), n),
              _on_envs(out, n))

    k_steps, k_boot = jax.random.split(key)
    carry, traj = jax.lax.scan(step, carry0, jax.random.split(k_steps, num_steps))
    env_state, buffers, text_ids, text_mask, _, prefix, _ = carry
    boot = policy(model, buffers, env_state.obs, text_ids, text_mask, k_boot, mask_table, prefix)[3]
    if continue_episodes:
      return traj, boot, Episodes(env_state=env_state, buffers=buffers, text_ids=text_ids, text_mask=text_mask)
    return traj, boot

  collect.spec = spec
  return collect


def sequences(layout: PromptLayout, traj: Trajectory, token_valid: jax.Array) -> dict[str, jax.Array]:
  """Full teacher-forced sequences (prompt + sampled action ids) of flattened rows ``[B, ...]``."""
  out = assemble(layout, jnp, traj.text_ids, traj.text_mask, traj.frame_valid, traj.hist_ids, token_valid,
                 target_action_ids=traj.tokens)
  out.update(image=traj.images, state=traj.states)
  return out


def decode_without_cache(model, layout: PromptLayout, prompt, mask_table, token_valid, key, *, greedy: bool,
                         temperature: float = 1.0, candidate_ids=None) -> Decoded:
  """Like `decode_action_tokens`, but each action token re-runs the whole context (no KV cache).

  The sequence is the full ``seq_len`` layout with the not-yet-sampled action slots masked out; causal
  attention makes the hidden state at ``prompt_len - 1 + j`` depend only on the prompt and tokens < j.
  """
  b = prompt["input_ids"].shape[0]
  T, P = layout.action_tokens, layout.prompt_len
  emb = prompt["embodiment_id"]
  tokens = jnp.full((b, T), layout.pad_id, jnp.int32)
  total = jnp.zeros((b,), jnp.float32)
  value = jnp.zeros((b,), jnp.float32)
  pos0 = prompt["positions"][:, -1]
  for j in range(T):
    done_mask = (jnp.arange(T) < j)[None] & token_valid
    ids = jnp.concatenate([prompt["input_ids"], jnp.where(done_mask, tokens, layout.pad_id)], 1)
    mask = jnp.concatenate([prompt["attention_mask"], done_mask.astype(jnp.int32)], 1)
    positions = jnp.concatenate([prompt["positions"], pos0[:, None] + jnp.cumsum(done_mask, 1)], 1)
    out = model.forward(ids, prompt["image"], prompt["state"], mask, positions)
    h = out.hidden_states[:, P - 1 + j:P + j]
    if j == 0 and model.vlm.value_head is not None:
      value = model.value(h[:, 0])
    key, sub = jax.random.split(key)
    tok, logp = sample_token(model, h, emb, mask_table, j, token_valid[:, j], sub, greedy=greedy,
                             temperature=temperature, pad_id=layout.pad_id, candidate_ids=candidate_ids)
    total = total + logp
    tokens = tokens.at[:, j].set(tok)
  return Decoded(tokens, total, value)


__all__ = ["Episodes", "ResetPool", "Trajectory", "initial_episodes", "make_reset_pool", "make_collector",
           "refresh_prefix_rows", "sequences", "decode_without_cache"]
