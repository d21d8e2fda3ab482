"""The agent network: the VLM (vision encoder -> projector -> LLM, value head) plus a state token.

It consumes the fixed-slot sequences of `gea_jax.agent.prompt`: image slots receive the projected
image tokens of their frame, state slots a projection of that frame's proprioceptive state (linear, or a
one-hidden-layer GELU MLP when ``model.state_hidden_dim`` > 0),
every other slot the LLM's token embedding. With ``model.vision.text_film`` the vision encoder is FiLM-conditioned
on the prompt's text (the masked mean of its token embeddings; RT-1 conditions its encoder on the instruction
the same way), so the image tokens can already single out what the instruction names.
With ``model.grounding_head`` it also has a linear head over the LLM's hidden states at the image slots, trained by
SFT's grounding loss only (`gea_jax.agent.grounding`; not used when acting).
`AgentModel.forward` also runs a part of a sequence (``offset``): the text alone, or the frames on top of a KV
cache of the text (`gea_jax.agent.policy.text_prefix_cache`). `build_agent` makes one from a config: a random tiny LLM
for fast CPU runs, or a pretrained LLM (HF directory / GGUF) whose vocabulary is grown to hold the
action tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gea_jax.agent.prompt import IMAGE_SLOT, STATE_SLOT, PromptLayout
from gea_jax.models.llm import CausalLM, LlmConfig, LlmOutput
from gea_jax.models.lora import LoraConfig, apply_lora
from gea_jax.models.vlm import VLM, VLMConfig, build_vlm
from gea_jax.sharding import constrain


class AgentModel(nnx.Module):
  """VLM + state projection over the prompt layout's static slots.

  ``state_hidden``: 0 = the state token is a linear projection of the state; > 0 = a GELU MLP with one hidden
  layer of that width (``state_mlp`` then ``state_proj``). ``grounding``: add ``grounding_head`` (hidden state at
  an image slot -> one logit: the instruction's object is in this token), see `gea_jax.agent.grounding`.
  """

  def __init__(self, vlm: VLM, layout: PromptLayout, state_dim: int, *, state_hidden: int = 0,
               grounding: bool = False, rngs: nnx.Rngs):
    width = vlm.llm.config.hidden_size
    self.vlm = vlm
    self.layout = layout
    self.state_dim = int(state_dim)
    state_in = max(self.state_dim, 1)
    if int(state_hidden) < 0:
      raise ValueError(f"AgentModel: state_hidden must be >= 0 (0 = linear state token), got {state_hidden}")
    state_mlp = None
    if state_hidden:
      hidden_init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "mlp"))
      state_mlp = nnx.Linear(state_in, int(state_hidden), kernel_init=hidden_init, rngs=rngs)
      state_in = int(state_hidden)
    self.state_mlp = nnx.data(state_mlp)
    init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("mlp" if state_hidden else None, "embed"))
    self.state_proj = nnx.Linear(state_in, width, kernel_init=init, rngs=rngs)
    head = None
    if grounding:
      head = nnx.Linear(width, 1, kernel_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("embed", None)),
                        rngs=rngs)
    self.grounding_head = nnx.data(head)
    slots = layout.slots()
    if vlm.tokens_per_image != layout.image_tokens:
      raise ValueError(f"layout.image_tokens={layout.image_tokens} but the VLM gives {vlm.tokens_per_image} "
                       f"tokens per image (pool_grid={vlm.pool_grid})")
    self._kind = tuple(int(k) for k in slots["kind"])          # static: part of the graph, not state
    self._frame = tuple(int(f) for f in slots["frame_index"])

  @property
  def llm(self) -> CausalLM:
    return self.vlm.llm

  def part_bounds(self, offset: int, length: int) -> tuple[int, int]:
    """Check that slots [offset, offset + length) are a part of the layout the model can embed alone.

    A part starts at 0 or at ``text_len`` (the first frame slot) and ends at ``text_len``, ``prompt_len``
    or ``seq_len``: the text alone (`gea_jax.agent.policy.text_prefix_cache`), the frames (+ targets) on
    top of a text cache, or a whole prompt / sequence.
    """
    L = self.layout
    start, end = int(offset), int(offset) + int(length)
    if start not in (0, L.text_len) or end not in (L.text_len, L.prompt_len, L.seq_len) or end <= start:
      raise ValueError(f"AgentModel: input_ids of length {length} at offset {offset} is not a part of the layout "
                       f"(offset must be 0 or text_len={L.text_len}; offset + length must be text_len, "
                       f"prompt_len={L.prompt_len} or seq_len={L.seq_len})")
    return start, end

  def text_condition(self, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
    """The vision encoder's FiLM condition: the masked mean of the text slots' token embeddings, [b, d]."""
    L = self.layout
    if text_ids.shape[-1] != L.text_len or text_mask.shape != text_ids.shape:
      raise ValueError(f"AgentModel.text_condition: expected text_ids and text_mask [batch, text_len={L.text_len}], "
                       f"got {tuple(text_ids.shape)} and {tuple(text_mask.shape)}")
    m = text_mask.astype(jnp.float32)[..., None]
    emb = self.llm.embed(text_ids.astype(jnp.int32)).astype(jnp.float32)
    return (emb * m).sum(1) / jnp.maximum(m.sum(1), 1.0)

  def embed(self, input_ids: jax.Array, images: jax.Array | None, states: jax.Array | None,
            offset: int = 0, condition: jax.Array | None = None) -> jax.Array:
    """input_ids [b,S], images [b,F,H,W,3], states [b,F,Ds] -> embeddings [b,S,d].

    ``input_ids`` holds the layout's slots ``offset .. offset + S`` (see `part_bounds`); images / states may
    be None when that part has no image / state slot (the text alone). ``condition``: the `text_condition` a
    FiLM-conditioned vision encoder needs for the image slots.
    """
    b, s = input_ids.shape
    start, end = self.part_bounds(offset, s)
    kind = np.asarray(self._kind[start:end])
    has_images = bool((kind == IMAGE_SLOT).any())
    image_mask = jnp.broadcast_to(kind == IMAGE_SLOT, (b, s))
    x = self.vlm.embed_inputs(input_ids, images if has_images else None, image_mask, condition)
    if self.layout.use_state and (kind == STATE_SLOT).any():
      if states is None:
        raise ValueError("AgentModel.embed: this part of the layout has state slots but states is None")
      st = states.astype(jnp.float32)
      if st.shape[-1] < self.state_dim:
        st = jnp.pad(st, ((0, 0), (0, 0), (0, self.state_dim - st.shape[-1])))
      st = st[..., :self.state_dim] if self.state_dim else jnp.zeros(st.shape[:2] + (1,))
      tok = self.state_proj(st if self.state_mlp is None else jax.nn.gelu(self.state_mlp(st)))
      frame = np.clip(np.asarray(self._frame[start:end]), 0, None)
      placed = tok[:, frame].astype(x.dtype)  # [b, S, d]
      x = jnp.where((kind == STATE_SLOT)[None, :, None], placed, x)
    return constrain(x, ("batch", "length", "embed"))

  def forward(self, input_ids, images, states, attention_mask, positions, cache=None, offset: int = 0,
              keep_last: int | None = None, text_ids=None, text_mask=None) -> LlmOutput:
    """Hidden states of the layout's slots ``offset .. offset + S`` (``offset=text_len``: the frames on top of a
    text-prefix ``cache``; ``positions`` are those of the full sequence). ``keep_last``: only the last that many
    positions' hidden states (see `CausalLM.forward`; 0 with a cache: just fill it). ``text_ids`` / ``text_mask``
    [b, text_len]: the text slots' ids and attention mask, needed by a FiLM-conditioned vision encoder when the
    part starts after the text (at offset 0 they are read from ``input_ids`` / ``attention_mask``)."""
    condition = None
    L = self.layout
    if self.vlm.condition_dim and (np.asarray(self._kind[offset:offset + input_ids.shape[1]]) == IMAGE_SLOT).any():
      if offset == 0:
        text_ids, text_mask = input_ids[:, :L.text_len], attention_mask[:, :L.text_len]
      elif text_ids is None or text_mask is None:
        raise ValueError("AgentModel.forward: the vision encoder is conditioned on the text (model.vision.text_film) "
                         f"and this part starts at offset {offset}: pass text_ids and text_mask [batch, "
                         f"text_len={L.text_len}]")
      condition = self.text_condition(text_ids, text_mask)
    x = self.embed(input_ids, images, states, offset, condition)
    return self.llm.forward(inputs_embeds=x, positions=positions, attention_mask=attention_mask, cache=cache,
                            compute_logits=False, keep_last=keep_last)

  def value(self, hidden: jax.Array) -> jax.Array:
    return self.vlm.value(hidden)


def resize_vocab(llm: CausalLM, new_size: int, *, rngs: nnx.Rngs) -> CausalLM:
  """Grow the token embedding (and an untied lm_head) to ``new_size`` rows, in place.

  New rows start at the mean of the existing embeddings plus small noise (a common, stable choice).
  """
  old = llm.config.vocab_size
  if new_size == old:
    return llm
  if new_size < old:
    raise ValueError(f"resize_vocab: new_size={new_size} is smaller than the vocabulary ({old})")

  def grow(w):
    w = jnp.asarray(w)
    extra = jnp.mean(w.astype(jnp.float32), 0, keepdims=True) + 0.02 * jax.random.normal(
        rngs.params(), (new_size - old, w.shape[1]))
    return jnp.concatenate([w, extra.astype(w.dtype)], 0)

  llm.embed_tokens.embedding.set_value(grow(llm.embed_tokens.embedding.get_value()))
  if getattr(llm, "lm_head", None) is not None:
    k = llm.lm_head.kernel.get_value()  # [embed, vocab]
    llm.lm_head.kernel.set_value(grow(k.T).T)
    llm.lm_head.out_shape = (new_size,)
  llm.config = dataclasses.replace(llm.config, vocab_size=new_size)
  return llm


def build_llm(cfg, vocab_size: int, *, rngs: nnx.Rngs) -> CausalLM:
  """The LLM of ``config.model.llm``: ``source`` "random" (tiny, from the given dims) or a path/"smollm2"."""
  dtype = cfg.dtype
  if cfg.source == "random":
    lc = LlmConfig(architecture=cfg.architecture, vocab_size=vocab_size, hidden_size=cfg.hidden_size,
                   intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                   num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                   head_dim=cfg.hidden_size // cfg.num_heads, tie_word_embeddings=True,
                   max_position_embeddings=4096, dtype=dtype, param_dtype="float32", remat=bool(cfg.remat))
    return CausalLM(lc, rngs=rngs)
  from gea_jax.interop.hf import load_causal_lm
  path = cfg.source
  if path == "smollm2":
    from gea_jax.interop.gguf import smollm2_path
    path = smollm2_path()
  llm = load_causal_lm(path, jnp.float32, compute_dtype=dtype, remat=bool(cfg.remat))
  return resize_vocab(llm, max(vocab_size, llm.config.vocab_size), rngs=rngs)


def build_agent(model_cfg, layout: PromptLayout, state_dim: int, vocab_size: int, *, seed: int = 0) -> AgentModel:
  """AgentModel from ``config.model`` (llm, vision, lora sections)."""
  rngs = nnx.Rngs(seed)
  llm = build_llm(model_cfg.llm, vocab_size, rngs=rngs)
  if model_cfg.train_mode == "lora":
    apply_lora(llm, LoraConfig(rank=int(model_cfg.lora.rank), alpha=float(model_cfg.lora.alpha),
                               target_modules=tuple(model_cfg.lora.target_modules)), rngs)
  v = model_cfg.vision
  vcfg = VLMConfig(vision=v.encoder, pool_grid=tuple(v.pool_grid), image_size=v.image_size or None,
                   value_hidden_dim=int(model_cfg.value_hidden_dim), tiny_cnn_channels=tuple(v.channels),
                   tiny_cnn_coords=bool(v.get("coord_channels", False)),
                   tiny_cnn_condition_dim=llm.config.hidden_size if v.get("text_film", False) else 0)
  vlm = build_vlm(vcfg, llm, rngs=rngs)
  return AgentModel(vlm, layout, state_dim, state_hidden=int(model_cfg.get("state_hidden_dim", 0)),
                    grounding=bool(model_cfg.get("grounding_head", False)), rngs=rngs)


def trainable_filter(model_cfg) -> Any:
  """What the optimizer updates: LoRA adapters (+ everything outside the LLM), or all, or no LLM params, or (PPO's
  "lora_value") the LoRA adapters and the value head only, or (PPO's "lora_fixed_embeddings") "lora" without the
  embedding table."""
  from gea_jax.models.lora import LoraParam
  mode = model_cfg.train_mode
  if mode == "full":
    return nnx.Param
  outside_llm = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("llm")))
  if mode == "lora":
    # Action-token embeddings live in the LLM's (frozen) table; the extended rows must learn, so the
    # embedding table is trained too when the vocabulary was extended.
    return nnx.Any(LoraParam, outside_llm, nnx.PathContains("embed_tokens"))
  if mode == "frozen":
    return outside_llm
  if mode == "lora_value":  # PPO only: the LoRA adapters and the value head; all else stays as SFT left it
    return nnx.Any(LoraParam, nnx.PathContains("value_head"))
  if mode == "lora_fixed_embeddings":  # PPO only: "lora" but the embedding table stays as SFT left it
    return nnx.Any(LoraParam, outside_llm)
  raise ValueError("model.train_mode: expected 'lora', 'full', 'frozen' or (PPO) 'lora_value' / "
                   f"'lora_fixed_embeddings', got {mode!r}")
