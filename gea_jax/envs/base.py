"""The `Embodiment` interface: a body plus a task family as a pure-JAX environment.

An embodiment is a stateless object holding static configuration (its `EmbodimentSpec`, physics
system, renderer, task sets). All dynamic data lives in an `EnvState` pytree, so

    state = emb.reset(key, task_split="train")     # jit- and vmap-able
    state = emb.step(state, action)                 # jit- and vmap-able
    emb.instruction(state)                          # host side: the task in words

`task_split` is a static Python string (close over it before `jit`). Splits:

  "train"          tasks for training;
  "heldout_seed"   the same task distribution, but drawn from a random stream disjoint from
                   "train" (the split is folded into the key), i.e. unseen layouts / goals;
  "heldout_combo"  (grid tasks only) tasks whose target colour-object combination is in a fixed
                   list that never appears in the "train" split.

Episodes end (`done`) on success (`terminal`) or at `spec.max_episode_steps` (truncation). The
env does NOT auto-reset: once `done` is set, further steps keep simulating but the caller is
expected to reset (e.g. `jnp.where(done, reset(...), state)` in a training loop).
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from gea_jax.envs.spec import EmbodimentSpec

SPLITS = ("train", "heldout_seed", "heldout_combo")


@struct.dataclass
class EnvState:
  """Dynamic state of one environment (add a leading batch axis with vmap).

  obs: {"image": uint8 [H, W, 3], "state": f32 [state_dim]}.
  reward: f32 reward of the last transition (0 after reset).
  done: episode over (success or time limit). terminal: ended by success (no bootstrapping).
  success: the task's success test holds at this step.
  step: number of steps taken since reset (int32).
  task_id: index of the task family inside the embodiment (int32).
  task: the sampled task parameters (goal position, target objects, ...): a dict of arrays that
    `Embodiment.instruction` turns into words.
  inner: embodiment-specific simulator state (brax pipeline state, grid, agent, ...).
  """

  obs: dict[str, jax.Array]
  reward: jax.Array
  done: jax.Array
  terminal: jax.Array
  success: jax.Array
  step: jax.Array
  task_id: jax.Array
  task: dict[str, jax.Array]
  inner: Any


def split_key(key: jax.Array, task_split: str) -> jax.Array:
  """Folds the split into the key so that "train" and "heldout_*" draw disjoint random streams."""
  check_split(task_split, SPLITS)
  return jax.random.fold_in(key, SPLITS.index(task_split))


def check_split(task_split: str, allowed: tuple[str, ...], who: str = "") -> None:
  if task_split not in allowed:
    raise ValueError(f"{who or 'embodiment'}: unknown task_split={task_split!r}; expected one of {list(allowed)}")


def finish_step(state: EnvState, *, obs, reward, success, inner, max_steps: int,
                task: dict | None = None) -> EnvState:
  """Shared bookkeeping after one transition: step count, done/terminal flags."""
  step = state.step + 1
  success = jnp.asarray(success, bool)
  terminal = success
  done = terminal | (step >= max_steps)
  return state.replace(obs=obs, reward=jnp.asarray(reward, jnp.float32), done=done, terminal=terminal,
                       success=success, step=step, inner=inner, task=state.task if task is None else task)


class Embodiment(abc.ABC):
  """A body and task family. Subclasses set `spec` and implement reset/step/instruction."""

  spec: EmbodimentSpec
  task_splits: tuple[str, ...] = ("train", "heldout_seed")

  @property
  def name(self) -> str:
    return self.spec.name

  @abc.abstractmethod
  def reset(self, key: jax.Array, task_split: str = "train") -> EnvState:
    """Samples a task and an initial state (pure, jittable, vmappable)."""

  @abc.abstractmethod
  def step(self, state: EnvState, action: jax.Array) -> EnvState:
    """One transition (pure, jittable, vmappable). Continuous actions are clipped to the spec bounds;
    discrete actions are an int32 scalar (or shape [1])."""

  @abc.abstractmethod
  def describe_task(self, task: dict[str, Any], task_id: int) -> str:
    """The instruction for one unbatched task (numpy values)."""

  def instruction(self, state: EnvState) -> str | list[str]:
    """Natural-language instruction of the state's task (host side). A batched state gives a list."""
    task, task_id = jax.device_get((state.task, state.task_id))
    if getattr(task_id, "ndim", 0) == 0:
      return self.describe_task(task, int(task_id))
    return [self.describe_task(jax.tree_util.tree_map(lambda x, i=i: x[i], task), int(task_id[i]))
            for i in range(task_id.shape[0])]

  def is_success(self, state: EnvState) -> jax.Array:
    """The success test of the current state (computed in `step`)."""
    return state.success

  def target_point(self, state: EnvState) -> jax.Array:
    """Where the object the instruction names is in the image: float32 [2] (row, col) in [0, 1] of the image
    height / width, or (-1, -1) when the embodiment does not say (the default) or the object is not in view.

    Recorded in the expert datasets (privileged, never an input of the agent) as the label of SFT's grounding
    loss (`gea_jax.agent.grounding`). Pure, jittable, vmappable.
    """
    del state
    return jnp.full((2,), -1.0, jnp.float32)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.spec.name!r})"
