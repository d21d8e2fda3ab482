"""Stage 2 alone: PPO of the VLM agent, starting from an SFT run (GEA: LoRA + value head).

    python -m gea_jax.main --config=configs/ppo.py --workdir=workdirs/ppo \
      --config.ppo.sft_workdir=workdirs/demo --config.sft.tokenizer_artifact=workdirs/demo/rvq/artifact \
      --config.data.data_dir=workdirs/demo/data

The model section must match the SFT run's (same config file values); ``ppo.train_mode`` picks what PPO
trains ("lora": adapters are attached to a full-SFT model if it has none; "lora_fixed_embeddings": the same but the
embedding table stays as SFT left it; "lora_value": adapters + value head only; "frozen": LLaRP; "full").
"""

from gea_jax.agent.config import agent_config
from gea_jax.train.ppo import ppo_defaults


def get_config(arg=None):
  del arg
  c = agent_config()
  c.trainer = "ppo"
  c.ppo = ppo_defaults()
  c.ppo.train_mode = "lora"
  return c
