"""One VLM PPO iteration (collection + update) on one device vs over a mesh of 8 fake CPU devices.

    .venv/bin/python experiments/bench_vlm_ppo_mesh.py --workdir=/tmp/demo_final [--shape=8,1,1] [--iters=3]

``--workdir``: a run of configs/default.py (its ``data/`` datasets and ``rvq/artifact`` tokenizer). The agent is
configs/default.py's (tiny CNN + 3-layer Llama, untrained: the speed does not depend on the weights), PPO with
its ``ppo`` defaults (both embodiments, 8 envs x 16 steps each). Each side builds its learner, runs iteration 0
(compiles the collectors and the update) and then ``--iters`` more iterations; it reports the compile-including
first iteration and the median of the others. The two sides run one after the other in this process, on the
same 2 cores: the 8 "devices" share them, so this measures the overhead of the sharded program on a CPU, not a
speed-up (real devices would run their shards in parallel). Last line: one JSON object.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
from gea_jax.fake_devices import use_fake_cpu_devices  # noqa: E402  (before jax: it sets XLA_FLAGS)

use_fake_cpu_devices(8)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True, help="a configs/default.py run (data/ and rvq/artifact)")
  ap.add_argument("--shape", default="8,1,1", help="the sharded side's mesh (data,fsdp,tensor)")
  ap.add_argument("--iters", type=int, default=3, help="iterations timed after the first")
  args = ap.parse_args()

  from configs.default import get_config
  from gea_jax import sharding
  from gea_jax.agent.context import load_context
  from gea_jax.agent.model import build_agent
  from gea_jax.train import ppo, sft

  config = get_config()
  data_dir, artifact = os.path.join(args.workdir, "data"), os.path.join(args.workdir, "rvq", "artifact")
  names = ppo.embodiment_names(config)
  ctx = load_context(config, artifact, data_dir, names)
  shape = tuple(int(s) for s in args.shape.split(","))
  out = {}
  for label, mesh in (("1_device", sharding.make_mesh((1, 1, 1), jax.devices()[:1])),
                      ("mesh_" + "x".join(map(str, shape)), sharding.make_mesh(shape))):
    mesh, rules = sft.mesh_and_rules(config, mesh)
    ppo.validate_mesh(config, mesh, names)
    model = build_agent(config.model, ctx.layout, ctx.max_state_dim, ctx.vocab.total_vocab_size,
                        seed=int(config.seed))
    wrt, _ = ppo.prepare_model(model, config)
    learner = ppo.VlmPPO(config.ppo, ctx, model, wrt, names, seed=0, mesh=mesh, rules=rules)
    times = []
    for it in range(1 + args.iters):
      t = time.perf_counter()
      m = learner.iteration(it)  # returns host floats: the iteration has finished
      times.append(time.perf_counter() - t)
    out[label] = {"first_iteration_s": round(times[0], 2), "iteration_s": round(statistics.median(times[1:]), 3),
                  "loss": round(m["loss"], 5)}
    print(label, out[label], flush=True)
  a, b = out.values()
  out["sharded_over_1_device_time"] = round(b["iteration_s"] / a["iteration_s"], 2)
  out["config"] = {"embodiments": names, "num_envs": int(config.ppo.num_envs),
                   "unroll_length": int(config.ppo.unroll_length), "shape": list(shape)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
