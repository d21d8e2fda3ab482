"""Everything the agent needs besides its weights, built once and shared by SFT, eval and PPO.

An `AgentContext` holds the action tokenizer + vocabulary (the RVQ artifact), the text tokenizer, the
prompt layout, the embodiment specs (in vocabulary order) and the state normalization statistics from
the datasets, so the same observation is encoded identically in training and in the environment.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from gea_jax.agent.prompt import PromptLayout
from gea_jax.envs.spec import EmbodimentSpec


@dataclasses.dataclass
class AgentContext:
  vocab: Any                       # ActionVocab
  text_tokenizer: Any
  layout: PromptLayout
  specs: tuple[EmbodimentSpec, ...]  # vocabulary order; embodiment_id indexes this
  state_stats: tuple[Any, ...]     # per embodiment VectorStats | None (for env observations)
  action_stats: tuple[Any, ...]    # per embodiment VectorStats | None (pipeline normalization)
  max_state_dim: int
  image_size: tuple[int, int]
  normalization: str = "mean_std"

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.specs)

  def index(self, name: str) -> int:
    return self.vocab.embodiment_index(name)

  def normalize_state(self, embodiment_id: int, state: np.ndarray) -> np.ndarray:
    """Raw env state [..., ds] -> normalized and zero-padded to max_state_dim, as the pipeline does."""
    ds = self.specs[embodiment_id].state_dim
    out = np.zeros(state.shape[:-1] + (self.max_state_dim,), np.float32)
    if ds:
      s = np.asarray(state, np.float32)[..., :ds]
      st = self.state_stats[embodiment_id]
      if st is not None and self.normalization != "none":
        s = st.normalize(s, self.normalization)
      out[..., :ds] = s
    return out

  def tokens_per_action(self) -> list[int]:
    return [self.vocab.tokens_per_action(i) for i in range(len(self.specs))]


def make_layout(config, vocab, text_pad_id: int = 0) -> PromptLayout:
  m, d = config.model, config.data
  gh, gw = tuple(m.vision.pool_grid)
  return PromptLayout(text_len=int(m.text_len), history=int(d.history) - 1, image_tokens=gh * gw,
                      use_state=bool(m.use_state), action_tokens=int(vocab.max_tokens), pad_id=int(text_pad_id),
                      image_placeholder_id=int(text_pad_id))


def load_context(config, artifact_dir: str, data_dir: str, embodiments: Sequence[str]) -> AgentContext:
  """Builds the context from the RVQ artifact, the text tokenizer of config.model and the datasets."""
  from data_pipelines.rlds_builder import open_dataset
  from gea_jax.interop.tokenizers import load_text_tokenizer
  from gea_jax.tokenizers.artifact import load_artifact

  _, vocab = load_artifact(artifact_dir)
  text_tok = load_text_tokenizer(resolve_text_tokenizer(config.model.text_tokenizer))
  layout = make_layout(config, vocab)
  specs = tuple(vocab.specs)
  unknown = [e for e in embodiments if e not in vocab.names]
  if unknown:
    raise ValueError(f"data.embodiments {unknown} are not in the action tokenizer's embodiments {list(vocab.names)}")
  state_stats, action_stats = [], []
  from data_pipelines.rlds_builder import dataset_path
  for s in specs:
    # Embodiments this run uses must have a readable dataset (errors name the file); others in the
    # tokenizer's vocabulary may have none, and then carry no statistics.
    if s.name in embodiments or dataset_path(data_dir, s.name).exists():
      norm = open_dataset(data_dir, s.name).normalization
    else:
      norm = None
    state_stats.append(None if norm is None else norm.state)
    action_stats.append(None if norm is None else norm.action)
  max_state = max(s.state_dim for s in specs)
  img = int(config.data.image_size)
  return AgentContext(vocab=vocab, text_tokenizer=text_tok, layout=layout, specs=specs,
                      state_stats=tuple(state_stats), action_stats=tuple(action_stats), max_state_dim=max_state,
                      image_size=(img, img), normalization=str(config.data.normalization))


def resolve_text_tokenizer(source: str) -> str:
  if source == "smollm2":
    from gea_jax.interop.gguf import smollm2_path
    return smollm2_path()
  return source
