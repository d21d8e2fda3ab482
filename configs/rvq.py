"""Stage 0: the multi-embodiment residual-VQ action tokenizer.

    python -m gea_jax.main --config=configs/rvq.py --workdir=/tmp/rvq
    python -m gea_jax.main --config=configs/rvq.py --workdir=/tmp/rvq \
        --config.data.source=tfds --config.data.data_dir=/data/gea

``arg`` (``configs/rvq.py:ARG``) picks the embodiments, comma-separated (default: the continuous
bodies with a registered expert -- reacher, pusher; add halfcheetah once its expert is registered --
plus one grid world, which gets reserved ids but no training data).
Writes WORKDIR/artifact (``gea_jax.tokenizers.artifact.load_artifact``), TensorBoard events,
metrics.jsonl and report.md.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.trainer = "tokenizer"

  config.rvq = ml_collections.ConfigDict()
  config.rvq.num_levels = 2  # L residual codebooks (GEA: 2)
  config.rvq.codebook_size = 512  # K codes per level
  config.rvq.latent_dim = 16
  config.rvq.hidden = 256
  config.rvq.num_layers = 2
  config.rvq.chunk_len = 1  # H actions per chunk -> H * L tokens
  config.rvq.embodiment_dim = 16
  config.rvq.commitment = 0.25
  config.rvq.ema_decay = 0.99
  config.rvq.dead_code_threshold = 50  # updates without use before a code is re-seeded

  config.train = ml_collections.ConfigDict()
  config.train.steps = 3000
  config.train.batch_size = 1024
  config.train.lr = 1e-3
  config.train.warmup_steps = 100
  config.train.seed = 0
  config.train.log_every = 100
  config.train.eval_size = 8192  # chunks per embodiment for the final encode -> decode NMSE

  config.data = ml_collections.ConfigDict()
  config.data.source = "experts"  # "tfds" (data_dir) or "experts" (fresh expert rollouts)
  config.data.data_dir = ""
  config.data.split = "train"
  config.data.max_episodes = 0  # 0: all episodes of the split
  config.data.expert_episodes = 64
  config.data.embodiments = tuple(arg.split(",")) if arg else ("reacher", "pusher", "grid_goto")

  config.vocab = ml_collections.ConfigDict()
  config.vocab.llm_vocab_size = 49152  # SmolLM2
  config.vocab.mode = "extend"  # or "reuse_tail"

  config.mesh = ml_collections.ConfigDict()
  config.mesh.shape = (-1, 1, 1)
  return config
