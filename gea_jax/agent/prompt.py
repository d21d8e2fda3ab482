"""The prompt layout: one fixed-shape token sequence per decision, shared by SFT, eval, PPO and export.

A sequence has static slots, so every consumer (the SFT loss, token-by-token decoding, PPO's
teacher-forced re-scoring, the exported agent) finds the same thing at the same index::

    [ text: "<embodiment prompt> <instruction>", left-padded to text_len              ]
    [ frame 0 (oldest): image tokens x n_image | state token | action tokens x T_a      ]
    [ ...                                                                               ]
    [ frame k-1:        image tokens x n_image | state token | action tokens x T_a      ]
    [ frame k (now):    image tokens x n_image | state token                            ]
    [ target action tokens x T_a  (predicted; absent from the prompt when decoding)     ]

* image and state slots hold placeholder ids in ``input_ids``; ``frame_index`` says which frame
  (0..k) and ``patch_index`` which image token a slot is, so the VLM scatters projected image/state
  embeddings into them;
* history frames that do not exist yet (start of an episode) are masked out of attention;
* positions are ``cumsum(attention_mask) - 1``, so masked slots do not shift RoPE positions, and a
  left-padded sequence is equivalent to a packed one;
* the loss reads the logits at the ``T_a`` positions just before each target token (``loss_mask``),
  i.e. cross-entropy on the action tokens only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IMAGE_SLOT = -1  # marks in the slot-kind arrays
STATE_SLOT = -2


@dataclasses.dataclass(frozen=True)
class PromptLayout:
  """Static sizes of the sequence; all indices below are derived from these."""

  text_len: int = 32            # embodiment prompt + instruction, left-padded/truncated to this
  history: int = 3              # k previous frames with their actions
  image_tokens: int = 4         # tokens per frame from the vision encoder
  use_state: bool = True        # one proprioceptive-state token per frame
  action_tokens: int = 2        # T_a = tokens per action (RVQ levels x chunk, or 1 for discrete)
  pad_id: int = 0
  image_placeholder_id: int = 0  # ids written into image/state slots (their embeddings are replaced)

  def __post_init__(self):
    for name in ("text_len", "image_tokens", "action_tokens"):
      if getattr(self, name) <= 0:
        raise ValueError(f"PromptLayout.{name} must be > 0, got {getattr(self, name)}")
    if self.history < 0:
      raise ValueError(f"PromptLayout.history must be >= 0, got {self.history}")

  @property
  def num_frames(self) -> int:
    return self.history + 1

  @property
  def frame_len(self) -> int:
    return self.image_tokens + int(self.use_state)

  @property
  def prompt_len(self) -> int:
    """Length of the context before the target action tokens."""
    return self.text_len + self.history * (self.frame_len + self.action_tokens) + self.frame_len

  @property
  def seq_len(self) -> int:
    return self.prompt_len + self.action_tokens

  def frame_start(self, f: int) -> int:
    return self.text_len + f * (self.frame_len + self.action_tokens)

  def slots(self) -> dict[str, np.ndarray]:
    """Static per-position arrays: frame_index (-1 = not a frame slot), patch_index, kind."""
    n = self.seq_len
    frame_index = np.full(n, -1, np.int32)
    patch_index = np.full(n, -1, np.int32)
    kind = np.zeros(n, np.int32)  # 0 text/action, IMAGE_SLOT, STATE_SLOT
    history_action_pos = np.zeros((max(self.history, 0), self.action_tokens), np.int32)
    for f in range(self.num_frames):
      s = self.frame_start(f)
      frame_index[s:s + self.frame_len] = f
      patch_index[s:s + self.image_tokens] = np.arange(self.image_tokens)
      kind[s:s + self.image_tokens] = IMAGE_SLOT
      if self.use_state:
        kind[s + self.image_tokens] = STATE_SLOT
      if f < self.history:
        a0 = s + self.frame_len
        history_action_pos[f] = np.arange(a0, a0 + self.action_tokens)
    target_pos = np.arange(self.prompt_len, self.seq_len, dtype=np.int32)
    return dict(frame_index=frame_index, patch_index=patch_index, kind=kind,
                history_action_pos=history_action_pos, target_pos=target_pos,
                logit_pos=target_pos - 1)


def assemble(layout: PromptLayout, xp, text_ids, text_mask, frame_valid, history_action_ids, action_token_valid,
             target_action_ids=None):
  """Batched sequence assembly, for numpy (host pipeline) or jax.numpy (device rollouts): ``xp``.

  Args (leading batch dim N):
    text_ids, text_mask: [N, text_len] left-padded text of the embodiment prompt + instruction.
    frame_valid: bool [N, history+1]; False for history frames before the episode start.
    history_action_ids: int [N, history, T_a] ids of the actions taken after each history frame.
    action_token_valid: bool [N, T_a]; False for action positions the embodiment does not use.
    target_action_ids: int [N, T_a] ids to predict, or None for a prompt (length prompt_len) to decode from.
  Returns input_ids, attention_mask, positions (and targets, loss_mask with targets).
  """
  L = layout
  sl = _SLOT_CACHE.setdefault(L, L.slots())
  n = text_ids.shape[0]
  frame_valid = xp.asarray(frame_valid).astype(bool)
  tok_valid = xp.asarray(action_token_valid).astype(bool)
  hist = xp.asarray(history_action_ids).astype(xp.int32).reshape(n, L.history * L.action_tokens)
  frame_len = L.frame_len
  # frame slots (image/state), per frame: placeholder ids, masked by frame validity
  parts_ids, parts_mask = [xp.asarray(text_ids).astype(xp.int32)], [xp.asarray(text_mask).astype(bool)]
  for f in range(L.num_frames):
    parts_ids.append(xp.full((n, frame_len), L.image_placeholder_id, xp.int32))
    parts_mask.append(xp.repeat(frame_valid[:, f:f + 1], frame_len, axis=1))
    if f < L.history:
      ok = frame_valid[:, f:f + 1] & tok_valid
      parts_ids.append(xp.where(ok, hist[:, f * L.action_tokens:(f + 1) * L.action_tokens], L.pad_id))
      parts_mask.append(ok)
  if target_action_ids is not None:
    tgt = xp.where(tok_valid, xp.asarray(target_action_ids).astype(xp.int32), L.pad_id)
    parts_ids.append(tgt)
    parts_mask.append(tok_valid)
  ids = xp.concatenate(parts_ids, axis=1)
  mask = xp.concatenate(parts_mask, axis=1).astype(xp.int32)
  positions = xp.maximum(xp.cumsum(mask, axis=1) - 1, 0).astype(xp.int32)
  out = dict(input_ids=ids, attention_mask=mask, positions=positions)
  if target_action_ids is not None:
    logit_pos = sl["logit_pos"]
    targets = xp.zeros((n, L.seq_len), xp.int32)
    loss_mask = xp.zeros((n, L.seq_len), xp.float32)
    if xp is np:
      targets[:, logit_pos] = tgt
      loss_mask[:, logit_pos] = tok_valid
    else:
      targets = targets.at[:, logit_pos].set(tgt)
      loss_mask = loss_mask.at[:, logit_pos].set(tok_valid.astype(xp.float32))
    out.update(targets=targets, loss_mask=loss_mask)
  return out


def left_pad(ids, length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Keep the last ``length`` ids, left-padded: (ids [length], mask [length])."""
  ids = np.asarray(ids, np.int32)[-length:]
  out = np.full(length, pad_id, np.int32)
  mask = np.zeros(length, np.int32)
  if len(ids):
    out[length - len(ids):] = ids
    mask[length - len(ids):] = 1
  return out, mask


def build_sequence(layout: PromptLayout, text_ids, frame_valid, history_action_ids, target_action_ids=None,
                   action_token_valid=None):
  """One example on the host (numpy): see `assemble`; ``text_ids`` is unpadded."""
  L = layout
  frame_valid = np.asarray(frame_valid, bool)
  if frame_valid.shape != (L.num_frames,):
    raise ValueError(f"frame_valid: expected shape ({L.num_frames},), got {frame_valid.shape}")
  tok_ok = (np.ones(L.action_tokens, bool) if action_token_valid is None
            else np.asarray(action_token_valid, bool).reshape(L.action_tokens))
  text, tmask = left_pad(text_ids, L.text_len, L.pad_id)
  tgt = None if target_action_ids is None else np.asarray(target_action_ids, np.int32).reshape(1, L.action_tokens)
  out = assemble(L, np, text[None], tmask[None], frame_valid[None],
                 np.asarray(history_action_ids, np.int32).reshape(1, L.history, L.action_tokens), tok_ok[None], tgt)
  return {k: v[0] for k, v in out.items()}


_SLOT_CACHE: dict[PromptLayout, dict[str, np.ndarray]] = {}


def embodiment_prompt(spec) -> str:
  """The text that introduces the body and its actions (GEA's environment prompt)."""
  a = spec.action_space
  if a.is_continuous:
    acts = f"continuous actions of dimension {a.dim}"
  else:
    acts = "one of the actions: " + ", ".join(a.names)
  desc = spec.description or spec.name
  return f"You control {desc}. You take {acts}. Instruction:"
