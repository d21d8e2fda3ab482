"""Where a grid agent fails: its closed-loop actions classified by what it faces and by the shortest plan.

    python experiments/grid_failures.py --workdir=workdirs/sft_vs_ppo [--config=configs/default.py] \\
        [--embodiment=grid_goto_ego] [--episodes=128] [--split=heldout_seed] [--ppo]

Loads the SFT agent of a pipeline workdir (`WORKDIR/sft`, with `WORKDIR/data` and `WORKDIR/rvq/artifact`) or, with
``--ppo``, the PPO run in `WORKDIR/ppo` at its last checkpoint (with the ppo settings it ran with, read from that
checkpoint; a run stopped before its ``ppo.iterations`` is probed where it stopped: nothing trains here), and runs
``--episodes`` episodes of a go-to / pick-up grid body as the evaluation does (`gea_jax.eval.evaluate_embodiment`,
decoding per ``eval.decoding``). Every step the agent takes is classified by the cell in front of it (floor, wall,
object, door) and by whether its action is a step of a shortest plan (the body's shaping potential, minus the
actions left to face the target, rises by one, or the step succeeds), separately for the episodes that succeed and
those that fail. Sessions 9 and 14 found the grid's failures to be one loop: facing an object it cannot walk into,
the agent keeps choosing "forward". The steps facing an object are split further by how that object relates to the
instruction's (the target's kind in another colour, its colour on another kind, or neither): a loop that happens
mostly in front of look-alikes is the instruction bound to the wrong object, one that happens in front of any object
is not seeing that something is there. Prints tables and, as the last line, a JSON object with the figures.
"""

from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "Agent config (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/demo", "The pipeline (or sft_vs_ppo) workdir holding the agent.")
_EMBODIMENT = flags.DEFINE_string("embodiment", "", "A go-to / pick-up grid body (\"\" = the config's first grid body).")
_EPISODES = flags.DEFINE_integer("episodes", 128, "Episodes, run in parallel.")
_SPLIT = flags.DEFINE_string("split", "heldout_seed", "Task split: train, heldout_seed or heldout_combo.")
_PPO = flags.DEFINE_bool("ppo", False, "Probe the PPO run in WORKDIR/ppo instead of the SFT agent.")

FRONT = ("floor", "wall", "object", "door")
MOVES = ("forward", "right", "left")
# the faced object vs the instruction's ("same_object": only at an episode's start, since arriving there succeeds)
RELATION = ("neither", "same_kind", "same_colour", "same_object")


def front_kind(front_tile):
  """int [n] from the tiles the agents face (`GridTask.front_tile`): an index into FRONT."""
  import numpy as np
  from xminigrid.core.constants import Tiles
  tile = np.asarray(front_tile)
  door = np.isin(tile, [Tiles.DOOR_LOCKED, Tiles.DOOR_CLOSED, Tiles.DOOR_OPEN])
  return np.select([tile == Tiles.FLOOR, tile == Tiles.WALL, door], [0, 1, 3], default=2)


def relation_to_target(front_cell, target):
  """int [n] from the (tile, colour) pairs faced and the instruction's objects (``task["obj_a"]``): an index into
  RELATION."""
  import numpy as np
  cell, target = np.asarray(front_cell), np.asarray(target)
  kind, colour = cell[:, 0] == target[:, 0], cell[:, 1] == target[:, 1]
  return kind.astype(int) + 2 * colour.astype(int)


def ppo_section(ppo_dir: str):
  """The ``ppo`` config section the PPO run in ``ppo_dir`` ran with (read from its last checkpoint) and that
  checkpoint's iteration; ``iterations`` is set to it, so that `ppo.train` restores it and trains no further (a run
  stopped early, e.g. by SIGTERM, is probed where it stopped)."""
  import ml_collections

  from gea_jax.checkpoint import Checkpointer, CheckpointError, load_step_meta
  try:
    with Checkpointer(ppo_dir, read_only=True) as ck:
      steps = ck.all_steps()
      if not steps:
        raise app.UsageError(f"--ppo: no PPO checkpoint in {ck.directory}")
      last_dir = ck.step_dir(steps[-1])
  except CheckpointError as e:
    raise app.UsageError(f"--ppo: {e}") from None
  saved = (load_step_meta(last_dir).get("config") or {}).get("ppo")
  if not saved:
    raise app.UsageError(f"--ppo: {last_dir} holds no ppo config section")
  if steps[-1] != int(saved["iterations"]):
    print(f"--ppo: the run in {ppo_dir} stopped at iteration {steps[-1]} of its ppo.iterations={saved['iterations']}: "
          "probing that checkpoint")
    saved["iterations"] = steps[-1]
  return ml_collections.ConfigDict(saved), steps[-1]


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from gea_jax.agent.context import load_context
  from gea_jax.envs import registry
  from gea_jax.eval import evaluate_embodiment, is_greedy
  from gea_jax.rl.shaping import has_potential
  from gea_jax.train import ppo as ppo_lib
  from gea_jax.train.pipeline import embodiment_names, eval_decoding, eval_seed

  config, wd = _CONFIG.value, os.path.abspath(_WORKDIR.value)
  config.data.data_dir = config.data.data_dir or os.path.join(wd, "data")
  config.sft.tokenizer_artifact = config.sft.tokenizer_artifact or os.path.join(wd, "rvq", "artifact")
  names = embodiment_names(config)
  name = _EMBODIMENT.value or next((n for n in names if n.startswith("grid")), "")
  if name not in names:
    raise app.UsageError(f"--embodiment={name!r} is not one of the config's data.embodiments {names}")
  env = registry.make(name)
  if not has_potential(env):
    raise app.UsageError(f"--embodiment={name}: no shaping potential to judge its steps by (go-to / pick-up grid "
                         "bodies have one)")
  ctx = load_context(config, config.sft.tokenizer_artifact, config.data.data_dir, names)
  model = ppo_lib.load_sft_model(config, wd, ctx)
  stage = "sft"
  if _PPO.value:
    config.ppo, iterations = ppo_section(os.path.join(wd, "ppo"))
    model = ppo_lib.train(config, wd, model, ctx, ppo_lib.embodiment_names(config), data_dir=config.data.data_dir).model
    stage = f"sft+ppo ({iterations} iterations)"

  potential = jax.jit(jax.vmap(env.shaping_potential))
  step = jax.jit(jax.vmap(env.step))
  facing = jax.jit(jax.vmap(env.front_cell))
  n = int(_EPISODES.value)
  steps_log = []  # per step: (live, action, front kind, on a shortest plan, succeeded here, relation), each [n]

  def on_step(t, states, action, live):
    before = np.asarray(potential(states))
    act = np.asarray(action).reshape(n)
    shortest = np.zeros(n, bool)
    for a in range(len(MOVES)):
      nxt = step(states, jnp.full((n,), a, jnp.int32))
      ok = (np.asarray(potential(nxt)) == before + 1) | np.asarray(nxt.success)
      shortest |= (act == a) & ok
    success = np.asarray(step(states, action).success)
    cell = np.asarray(facing(states))
    steps_log.append((live, act, front_kind(cell[:, 0]), shortest, live & success,
                      relation_to_target(cell, states.task["obj_a"])))

  result = evaluate_embodiment(model, ctx, name, num_episodes=n, split=_SPLIT.value, seed=eval_seed(config),
                               greedy=is_greedy(eval_decoding(config), env.spec), on_step=on_step)
  live = np.stack([s[0] for s in steps_log])          # [T, n]
  act = np.stack([s[1] for s in steps_log])
  front = np.stack([s[2] for s in steps_log])
  shortest = np.stack([s[3] for s in steps_log])
  succeeded = np.stack([s[4] for s in steps_log]).any(0)
  relation = np.stack([s[5] for s in steps_log])
  if abs(succeeded.mean() - result["success_rate"]) > 1e-9:
    raise RuntimeError(f"the steps' outcomes ({succeeded.mean()}) differ from the evaluation's ({result})")
  rows = {}
  for outcome, mask in (("succeeded", succeeded), ("failed", ~succeeded)):
    sel = live & mask[None]
    row = {"episodes": int(mask.sum()), "steps": int(sel.sum()),
           "shortest_plan_share": round(float(shortest[sel].mean()), 3) if sel.any() else None}
    for k, kind in enumerate(FRONT):
      here = sel & (front == k)
      row[f"facing_{kind}"] = {"steps": int(here.sum()),
                               **{f"p_{m}": round(float((act[here] == i).mean()), 3) if here.any() else None
                                  for i, m in enumerate(MOVES)}}
    facing_object = sel & (front == FRONT.index("object"))
    row["facing_object_by_relation"] = {
      rel: {"steps": int(here.sum()), "p_forward": round(float((act[here] == MOVES.index("forward")).mean()), 3) if here.any() else None}
      for r, rel in enumerate(RELATION) for here in [facing_object & (relation == r)]}
    rows[outcome] = row
  print(f"{name} ({_SPLIT.value}), {stage}: success {result['success_rate']:.1%} of {n} episodes")
  print("| episodes | facing | steps | P(forward) | P(right) | P(left) |")
  print("|---|---|---|---|---|---|")
  for outcome, row in rows.items():
    for kind in FRONT:
      f = row[f"facing_{kind}"]
      if f["steps"]:
        print(f"| {outcome} | {kind} | {f['steps']} | {f['p_forward']:.2f} | {f['p_right']:.2f} | {f['p_left']:.2f} |")
  print("\nFacing an object, by how it relates to the instruction's object:")
  print("| episodes | faced object | steps | P(forward) |")
  print("|---|---|---|---|")
  for outcome, row in rows.items():
    for rel, f in row["facing_object_by_relation"].items():
      if f["steps"]:
        print(f"| {outcome} | {rel} | {f['steps']} | {f['p_forward']:.2f} |")
  print(json.dumps({"workdir": wd, "embodiment": name, "split": _SPLIT.value, "stage": stage,
                    "success_rate": result["success_rate"], **rows}))


if __name__ == "__main__":
  app.run(main)
