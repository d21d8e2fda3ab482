"""Flax NNX modules: LLM (+KV cache, LoRA), vision encoders, projector, VLM, adapters."""
