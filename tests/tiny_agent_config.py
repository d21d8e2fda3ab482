"""The tests' tiny agent (1-layer LLM, 16-pixel frames, reacher + grid_goto) as an ml_collections config file.

Tests import ``tiny_config()``; runs through the entry point use the file itself (e.g. the multi-host tests):
``python -m gea_jax.main --config=tests/tiny_agent_config.py:ppo --workdir=W
--config.sft.tokenizer_artifact=A --config.data.data_dir=D``. The argument names the trainer: "sft" or "ppo"
(PPO on grid_goto from a freshly built agent, 8 envs x 2 steps, a checkpoint per iteration).
"""

from gea_jax.agent.config import agent_config

EMBODIMENTS = ("reacher", "grid_goto")


def tiny_config():
  c = agent_config()
  c.data.embodiments = ",".join(EMBODIMENTS)
  c.data.image_size = 16
  c.data.history = 3  # GEA's window (the embedded default uses 1): history frames are exercised
  c.model.text_len = 24
  c.model.llm.hidden_size = 32
  c.model.llm.intermediate_size = 64
  c.model.llm.num_layers = 1
  c.model.llm.num_heads = 2
  c.model.llm.num_kv_heads = 1
  c.model.vision.channels = (8, 8)
  c.model.value_hidden_dim = 16
  c.sft.batch_size = 8
  c.sft.steps = 6
  c.sft.log_every = 1
  c.sft.checkpoint_every = 3
  c.sft.keep_checkpoints = 3
  c.sft.warmup_steps = 1
  return c


def with_ppo(c, *, num_envs: int, unroll_length: int, reset_pool: int, iterations: int, lr: float,
             embodiments: str = "grid_goto"):
  """``c`` with a short PPO section: 1 epoch of 2 minibatches, no value warm-up, a checkpoint per iteration."""
  from gea_jax.train.ppo import ppo_defaults
  c.ppo = ppo_defaults()
  c.ppo.embodiments = embodiments
  c.ppo.num_envs = num_envs
  c.ppo.unroll_length = unroll_length
  c.ppo.reset_pool = reset_pool
  c.ppo.num_epochs = 1
  c.ppo.num_minibatches = 2
  c.ppo.iterations = iterations
  c.ppo.checkpoint_every = 1
  c.ppo.value_warmup_iterations = 0
  c.ppo.lr = lr
  return c


def get_config(trainer: str = "sft"):
  c = tiny_config()
  c.trainer = trainer
  if trainer == "ppo":
    # small Adam steps: meshes' reduction orders stay well inside the tests' 1e-5 (test_vlm_ppo.py)
    with_ppo(c, num_envs=8, unroll_length=2, reset_pool=1, iterations=2, lr=1e-4)
  elif trainer == "pipeline":  # the end-to-end run with its own tiny expert datasets, tokenizer and evaluation
    from gea_jax.train.ppo import ppo_defaults
    with_ppo(c, num_envs=8, unroll_length=2, reset_pool=1, iterations=1, lr=ppo_defaults().lr,
             embodiments=ppo_defaults().embodiments)
    c.data.episodes = 4
    c.data.episodes_by_embodiment = ""
    c.data.heldout_episodes = 2
    c.data.weights = ""
    c.rvq.steps = 10
    c.rvq.batch_size = 64
    c.rvq.codebook_size = 16
    c.eval.episodes = 4
  return c
