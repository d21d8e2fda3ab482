"""The embedded default: the whole GEA stack, tiny, end to end on one CPU in minutes.

    python -m gea_jax.main --config=configs/default.py --workdir=workdirs/demo

build expert datasets (reacher, grid_goto_ego) -> train the RVQ action tokenizer -> SFT a small VLM
(tiny CNN + 3-layer Llama, SmolLM2's tokenizer) on both embodiments -> closed-loop evaluation on
held-out seeds and held-out colour-object combinations -> WORKDIR/report.{json,md}.
"""

from gea_jax.agent.config import agent_config


def get_config(arg=None):
  del arg
  c = agent_config()
  c.trainer = "pipeline"
  return c
