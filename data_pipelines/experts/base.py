"""Expert registry: one demonstrator policy per embodiment name.

An `Expert` maps an `EnvState` (privileged: the full simulator state and task) and a PRNG key to
an action. Jittable experts (scripted controllers, trained MLPs) are rolled out batched under
`jax.jit(vmap(...))`; host-side experts (the grid planner) also provide `plan(state)`, an
open-loop action sequence for their deterministic env.

    experts.get("reacher").act(state, key)
    experts.register_policy("halfcheetah", ppo_policy_fn, expert_name="ppo_mlp")
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

import jax


@dataclasses.dataclass(frozen=True)
class Expert:
  """A demonstrator for one embodiment.

  embodiment: registry name of the embodiment it acts in.
  name: what kind of expert this is ("bfs_planner", "ik_pd", "ppo_mlp", ...), stored in datasets.
  act: (EnvState, key) -> action (f32 [dim] continuous, int32 scalar discrete).
  jittable: whether `act` can run under jit/vmap.
  plan: optional host-side (EnvState) -> list of actions reaching the goal, or None if unsolvable.
  noise_actions: discrete experts: the actions that executed-action noise (rollout's `action_noise`) draws from;
    None: all of the space's actions.
  """

  embodiment: str
  name: str
  act: Callable[[Any, jax.Array], Any]
  jittable: bool = True
  plan: Optional[Callable[[Any], Optional[list]]] = None
  noise_actions: Optional[tuple[int, ...]] = None


# embodiment name -> "module:builder" (lazy) or a built Expert.
_EXPERTS: dict[str, Any] = {
    "grid_goto": "data_pipelines.experts.grid_planner:make_expert",
    "grid_pickup": "data_pipelines.experts.grid_planner:make_expert",
    "grid_putnext": "data_pipelines.experts.grid_planner:make_expert",
    "grid_goto_ego": "data_pipelines.experts.grid_planner:make_expert",
    "grid_pickup_ego": "data_pipelines.experts.grid_planner:make_expert",
    "grid_putnext_ego": "data_pipelines.experts.grid_planner:make_expert",
    "reacher": "data_pipelines.experts.reacher:make_expert",
    "pusher": "data_pipelines.experts.pusher:make_expert",
    "halfcheetah": "data_pipelines.experts.halfcheetah:make_expert",
}
# Jittable, closed-loop stand-ins for host-side planners, used where a demonstration must re-plan after executed-action
# noise (DART): `get(name, closed_loop=True)`.
_CLOSED_LOOP: dict[str, Any] = {
    "grid_goto": "data_pipelines.experts.grid_field:make_expert",
    "grid_pickup": "data_pipelines.experts.grid_field:make_expert",
    "grid_goto_ego": "data_pipelines.experts.grid_field:make_expert",
    "grid_pickup_ego": "data_pipelines.experts.grid_field:make_expert",
}


def names() -> tuple[str, ...]:
  """Embodiments that have an expert."""
  return tuple(sorted(_EXPERTS))


def register_policy(name: str, fn: Callable[[Any, jax.Array], Any], *, expert_name: str = "policy",
                    jittable: bool = True, overwrite: bool = True) -> Expert:
  """Registers `fn(state, key) -> action` (e.g. a PPO-trained MLP) as the expert of embodiment `name`."""
  from gea_jax.envs import registry
  if name not in registry.names():
    raise KeyError(f"register_policy: unknown embodiment {name!r}; known embodiments: {', '.join(registry.names())}")
  if name in _EXPERTS and not overwrite:
    raise ValueError(f"register_policy: embodiment {name!r} already has an expert (pass overwrite=True)")
  expert = Expert(embodiment=name, name=expert_name, act=fn, jittable=jittable)
  _EXPERTS[name] = expert
  return expert


def _built(table: dict[str, Any], name: str) -> Expert:
  e = table[name]
  if isinstance(e, str):
    module, attr = e.split(":")
    e = getattr(importlib.import_module(module), attr)(name)
    table[name] = e
  return e


def get(name: str, *, closed_loop: bool = False) -> Expert:
  """The expert of embodiment `name`; closed_loop=True: a jittable one that re-decides at every step (the registered
  expert if it is jittable, else its closed-loop stand-in, e.g. the grid's distance field for its BFS planner)."""
  if name not in _EXPERTS:
    raise KeyError(f"no expert for embodiment {name!r}; embodiments with experts: {', '.join(names())} "
                   "(register one with experts.register_policy)")
  e = _built(_EXPERTS, name)
  if not closed_loop or e.jittable:
    return e
  if name not in _CLOSED_LOOP:
    raise KeyError(f"the expert of {name!r} ({e.name}) plans on the host and {name!r} has no closed-loop (jittable) "
                   f"expert; those exist for: {', '.join(sorted(_CLOSED_LOOP))}")
  return _built(_CLOSED_LOOP, name)
