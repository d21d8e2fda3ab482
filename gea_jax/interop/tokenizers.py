"""Text tokenizers from an HF directory (tokenizer.json), a SentencePiece `.model`, or a GGUF file.

`load_text_tokenizer(path)` returns a `TextTokenizer`: `encode(str) -> list[int]`, `decode(list[int]) -> str`,
`bos_id`, `eos_id`, `vocab_size`, and `apply_chat_template(messages)` where the source has a template.

A GGUF carries no tokenizer.json: its vocabulary, merges, token types and pre-tokenizer name live in the
metadata (`tokenizer.ggml.*`). For llama.cpp's byte-level BPE (`tokenizer.ggml.model == "gpt2"`) we rebuild
the equivalent `tokenizers` pipeline: the pre-tokenizer named by `tokenizer.ggml.pre` (e.g. SmolLM's
"smollm": single digits, then GPT-2's byte-level split), a BPE model over the file's vocab and merges, and
the tokens marked CONTROL / USER_DEFINED as added tokens so that `<|im_start|>` stays one token.
For llama.cpp's SentencePiece vocabularies (`"llama"`: Llama 2, Mistral) the BPE merges are recovered
from the token scores, with byte fallback and the dummy-prefix space as llama.cpp applies it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

GGUF_MAGIC = b"GGUF"

# llama.cpp's token types (llama_token_type / gguf.TokenType).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Split regexes of llama.cpp's pre-tokenizer types (llama-vocab.cpp), as `tokenizers` Split patterns.
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# GGUF `tokenizer.ggml.pre` -> pre-tokenizer family.
_PRE_TOKENIZERS = {
  "default": "gpt2",
  "gpt2": "gpt2",
  "gpt-2": "gpt2",
  # llama.cpp: `\p{N}` then GPT-2's regex, i.e. every digit is its own pre-token.
  "smollm": "digits+gpt2",
  "starcoder": "digits+gpt2",
  "refact": "digits+gpt2",
  "codeshell": "digits+gpt2",
  "llama3": "llama3",
  "llama-v3": "llama3",
  "llama-bpe": "llama3",
  "smaug-bpe": "llama3",
  "dbrx": "llama3",
  "qwen2": "qwen2",
  "deepseek-r1-qwen": "qwen2",
}


class TokenizerError(ValueError):
  """A tokenizer source that cannot be read; the message names the file and the key."""


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable unicode character map used by byte-level BPE vocabularies."""
  bs = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
  )
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


class TextTokenizer:
  """A text tokenizer with the interface the rest of gea_jax uses.

  `encode(text)` returns the ids of the text alone; `encode(text, add_special_tokens=True)` also adds
  what the source prescribes (e.g. a BOS token for Llama/SentencePiece models, nothing for SmolLM2).
  """

  def __init__(
    self,
    *,
    source: str,
    vocab_size: int,
    bos_token: str | None,
    eos_token: str | None,
    bos_id: int | None,
    eos_id: int | None,
    pad_id: int | None = None,
    chat_template: str | None = None,
    special_tokens: dict[str, str | None] | None = None,
  ):
    self.source = source
    self.vocab_size = int(vocab_size)
    self.bos_token, self.eos_token = bos_token, eos_token
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.chat_template = chat_template
    self._special_tokens = dict(special_tokens or {})

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    raise NotImplementedError

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    raise NotImplementedError

  def token_to_id(self, token: str) -> int | None:
    raise NotImplementedError

  def id_to_token(self, token_id: int) -> str | None:
    raise NotImplementedError

  def apply_chat_template(
    self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True
  ) -> str:
    """Render `messages` ([{"role": ..., "content": ...}, ...]) with the source's Jinja chat template.

    Rendered as transformers does (sandboxed Jinja, trim_blocks, lstrip_blocks, loop controls), with
    `bos_token`, `eos_token` and the other special tokens of the source as template variables.
    """
    if not self.chat_template:
      raise TokenizerError(
        f"{self.source}: no chat template (expected tokenizer.chat_template in a GGUF, or chat_template in "
        "tokenizer_config.json / chat_template.jinja in an HF directory)"
      )
    for i, m in enumerate(messages):
      if not isinstance(m, dict) or "role" not in m or "content" not in m:
        raise TokenizerError(
          f"apply_chat_template: messages[{i}] must be a dict with 'role' and 'content', got {m!r}"
        )
    # Only tokens the source defines: an undefined one renders as "" (as in transformers), not "None".
    variables = dict(self._special_tokens, bos_token=self.bos_token, eos_token=self.eos_token)
    variables = {k: v for k, v in variables.items() if v is not None}
    return _compile_template(self.chat_template).render(
      messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
    )

  def __repr__(self) -> str:
    return f"{type(self).__name__}(source={self.source!r}, vocab_size={self.vocab_size})"


class HFTextTokenizer(TextTokenizer):
  """Backed by a `tokenizers.Tokenizer` (an HF tokenizer.json, or one rebuilt from a GGUF)."""

  def __init__(self, tokenizer, **kwargs):
    super().__init__(**kwargs)
    self.tokenizer = tokenizer

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def id_to_token(self, token_id: int) -> str | None:
    return self.tokenizer.id_to_token(int(token_id))

  def save_pretrained(self, directory: str | os.PathLike) -> None:
    """Write tokenizer.json and tokenizer_config.json, which `transformers.AutoTokenizer` and
    `load_text_tokenizer` read back."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    self.tokenizer.save(os.path.join(directory, "tokenizer.json"))
    config: dict[str, Any] = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "clean_up_tokenization_spaces": False,
    }
    for name, value in self._special_tokens.items():
      if value is not None:
        config[name] = value
    config.update(bos_token=self.bos_token, eos_token=self.eos_token)
    if self.chat_template:
      config["chat_template"] = self.chat_template
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)


class SentencePieceTextTokenizer(TextTokenizer):
  """Backed by a `sentencepiece.SentencePieceProcessor`; `add_special_tokens=True` prepends BOS (Llama)."""

  def __init__(self, processor, **kwargs):
    super().__init__(**kwargs)
    self.processor = processor

  def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
    if not isinstance(text, str):
      raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = self.processor.encode(text, out_type=int)
    if add_special_tokens and self.bos_id is not None:
      ids = [self.bos_id] + ids
    return ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    ids = [int(i) for i in ids]
    if not skip_special_tokens:
      return self.processor.decode(ids)
    # Control tokens (<s>, </s>) decode to "" in SentencePiece already; drop them explicitly anyway.
    return self.processor.decode([i for i in ids if not self.processor.is_control(i)])

  def token_to_id(self, token: str) -> int | None:
    i = self.processor.piece_to_id(token)
    return None if i == self.processor.unk_id() and token != self.processor.id_to_piece(i) else i

  def id_to_token(self, token_id: int) -> str | None:
    if not 0 <= int(token_id) < self.vocab_size:
      return None
    return self.processor.id_to_piece(int(token_id))


@lru_cache(maxsize=16)
def _compile_template(template: str):
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    import datetime

    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise TokenizerError(f"chat template does not parse: {e}") from e


# ----------------------------------------------------------------------------------------------- loaders


def load_text_tokenizer(path: str | os.PathLike) -> TextTokenizer:
  """Load a text tokenizer from an HF directory / tokenizer.json, a SentencePiece model, or a GGUF file.

  Raises FileNotFoundError for a missing path and TokenizerError naming the file for an unknown format.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer not found: {path}")
  if os.path.isdir(path):
    return _from_hf_dir(path)
  with open(path, "rb") as f:
    head = f.read(4)
  if head == GGUF_MAGIC:
    return _from_gguf(path)
  if path.endswith(".gguf"):
    raise TokenizerError(f"{path}: not a GGUF file (magic {head!r}, expected {GGUF_MAGIC!r})")
  if os.path.basename(path) == "tokenizer.json" or path.endswith(".json"):
    return _from_tokenizer_json(path, os.path.dirname(path))
  base = os.path.basename(path)
  if ".model" in base or base.endswith(".spm"):
    return _from_sentencepiece(path)
  raise TokenizerError(
    f"{path}: unknown tokenizer format; expected an HF directory with tokenizer.json, a tokenizer.json, "
    "a SentencePiece .model file, or a .gguf file"
  )


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise TokenizerError(f"{path}: invalid JSON ({e})") from e
  if not isinstance(data, dict):
    raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def _token_content(value: Any) -> str | None:
  """A special token entry of tokenizer_config.json: a string or {"content": ...}."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  return None


def _from_hf_dir(directory: str) -> TextTokenizer:
  tj = os.path.join(directory, "tokenizer.json")
  if os.path.isfile(tj):
    return _from_tokenizer_json(tj, directory)
  sp = os.path.join(directory, "tokenizer.model")
  if os.path.isfile(sp):
    return _from_sentencepiece(sp)
  found = sorted(os.listdir(directory))[:20]
  raise TokenizerError(
    f"{directory}: no tokenizer.json (or tokenizer.model) in this directory; found {found}"
  )


def _from_tokenizer_json(path: str, directory: str) -> HFTextTokenizer:
  from tokenizers import Tokenizer

  try:
    tok = Tokenizer.from_file(path)
  except Exception as e:
    raise TokenizerError(f"{path}: cannot be read by the `tokenizers` library ({e})") from e
  cfg_path = os.path.join(directory, "tokenizer_config.json")
  cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
  model_cfg_path = os.path.join(directory, "config.json")
  model_cfg = _read_json(model_cfg_path) if os.path.isfile(model_cfg_path) else {}

  template = cfg.get("chat_template")
  if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if "default" not in named:
      raise TokenizerError(
        f"{cfg_path}: chat_template is a list without a 'default' entry (names: {sorted(named)})"
      )
    template = named["default"]
  jinja_path = os.path.join(directory, "chat_template.jinja")
  if template is None and os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      template = f.read()
  if template is not None and not isinstance(template, str):
    raise TokenizerError(f"{cfg_path}: chat_template must be a string, got {type(template).__name__}")

  special = {
    name: _token_content(cfg.get(name)) for name in ("bos_token", "eos_token", "unk_token", "pad_token")
  }

  def ident(kind: str) -> tuple[str | None, int | None]:
    token = special[f"{kind}_token"]
    if token is not None:
      i = tok.token_to_id(token)
      if i is None:
        raise TokenizerError(f"{cfg_path}: {kind}_token {token!r} is not in the vocabulary of {path}")
      return token, i
    i = model_cfg.get(f"{kind}_token_id")
    if isinstance(i, list):
      i = i[0] if i else None
    return (tok.id_to_token(i), i) if isinstance(i, int) else (None, None)

  bos_token, bos_id = ident("bos")
  eos_token, eos_id = ident("eos")
  pad_id = tok.token_to_id(special["pad_token"]) if special["pad_token"] else None
  return HFTextTokenizer(
    tok,
    source=path,
    vocab_size=tok.get_vocab_size(with_added_tokens=True),
    bos_token=bos_token,
    eos_token=eos_token,
    bos_id=bos_id,
    eos_id=eos_id,
    pad_id=pad_id,
    chat_template=template,
    special_tokens={k: v for k, v in special.items() if k not in ("bos_token", "eos_token")},
  )


def _from_sentencepiece(path: str) -> SentencePieceTextTokenizer:
  import sentencepiece as spm

  proc = spm.SentencePieceProcessor()
  try:
    proc.Load(path)
  except Exception as e:
    raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e

  def special(i: int) -> tuple[str | None, int | None]:
    return (proc.id_to_piece(i), i) if i >= 0 else (None, None)

  bos_token, bos_id = special(proc.bos_id())
  eos_token, eos_id = special(proc.eos_id())
  unk_token, _ = special(proc.unk_id())
  pad_token, pad_id = special(proc.pad_id())
  return SentencePieceTextTokenizer(
    proc,
    source=path,
    vocab_size=proc.get_piece_size(),
    bos_token=bos_token,
    eos_token=eos_token,
    bos_id=bos_id,
    eos_id=eos_id,
    pad_id=pad_id,
    special_tokens={"unk_token": unk_token, "pad_token": pad_token},
  )


def _byte_level_pre_tokenizer(kind: str):
  from tokenizers import Regex, pre_tokenizers

  if kind == "gpt2":
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if kind == "digits+gpt2":
    return pre_tokenizers.Sequence(
      [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
      ]
    )
  split = {"llama3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}[kind]
  return pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )


def _scored_merges(vocab: dict[str, int], scores: Sequence[float]) -> list[tuple[str, str]]:
  """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces, ranked by
  the merged piece's score (SentencePiece's BPE merges the highest-scoring pair first)."""
  ranked = []
  for piece, i in vocab.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in vocab and right in vocab:
        ranked.append((-float(scores[i]), vocab[left], vocab[right], left, right))
  ranked.sort()
  return [(left, right) for *_, left, right in ranked]


def _gguf_byte_level(path: str, meta: dict, tokens: list[str]):
  """llama.cpp's "gpt2" tokenizer: byte-level BPE with the merges from the file."""
  from tokenizers import Tokenizer, decoders, models

  if "tokenizer.ggml.merges" not in meta:
    raise TokenizerError(f"{path}: missing GGUF metadata key 'tokenizer.ggml.merges'")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in _PRE_TOKENIZERS:
    raise TokenizerError(
      f"{path}: GGUF pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; supported: {sorted(_PRE_TOKENIZERS)}"
    )
  # A byte-level vocabulary spells every token in GPT-2's byte alphabet; respell any that is not.
  spelling = bytes_to_unicode()
  alphabet = set(spelling.values())
  vocab = {}
  for i, t in enumerate(tokens):
    spelled = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
    vocab.setdefault(spelled, i)
  merges = []
  for j, m in enumerate(meta["tokenizer.ggml.merges"]):
    parts = m.split(" ")
    if len(parts) != 2:
      raise TokenizerError(
        f"{path}: tokenizer.ggml.merges[{j}] = {m!r} is not two tokens separated by a space"
      )
    merges.append((parts[0], parts[1]))
  family = _PRE_TOKENIZERS[pre]
  tok = Tokenizer(
    models.BPE(
      vocab=vocab,
      merges=merges,
      dropout=None,
      continuing_subword_prefix="",
      end_of_word_suffix="",
      fuse_unk=False,
      ignore_merges=family == "llama3",
    )
  )
  tok.pre_tokenizer = _byte_level_pre_tokenizer(family)
  tok.decoder = decoders.ByteLevel()
  # A CONTROL token outside the byte alphabet is a llama.cpp mislabel, not in the BPE vocab: not added.
  return tok, lambda t: set(t) <= alphabet


def _gguf_sentencepiece(path: str, meta: dict, tokens: list[str]):
  """llama.cpp's "llama" tokenizer: a SentencePiece BPE vocabulary with scores and <0xNN> byte pieces."""
  from tokenizers import Tokenizer, decoders, models, normalizers

  scores = meta.get("tokenizer.ggml.scores")
  if scores is None or len(scores) != len(tokens):
    raise TokenizerError(
      f"{path}: tokenizer.ggml.scores must give one score per token ({len(tokens)}), "
      f"got {None if scores is None else len(scores)}"
    )
  vocab = {}
  for i, t in enumerate(tokens):
    vocab.setdefault(t, i)
  unk = meta.get("tokenizer.ggml.unknown_token_id")
  tok = Tokenizer(
    models.BPE(
      vocab=vocab,
      merges=_scored_merges(vocab, scores),
      unk_token=tokens[int(unk)] if unk is not None else None,
      fuse_unk=True,
      byte_fallback=True,
      dropout=None,
    )
  )
  prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  # As llama.cpp (and SentencePiece's add_dummy_prefix): spaces become "\u2581" and every text fragment
  # (the whole text, or the text after a special token) gets one "\u2581" prepended, even when it starts
  # with a space. (transformers' Metaspace skips the prefix there, so "  a" differs by one token.)
  steps = [normalizers.Prepend("\u2581")] if prefix else []
  tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
  tok.pre_tokenizer = None
  steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
  if prefix:
    steps.append(decoders.Strip(content=" ", left=1))
  tok.decoder = decoders.Sequence(steps)
  return tok, lambda t: True


_GGUF_TOKENIZERS = {"gpt2": _gguf_byte_level, "llama": _gguf_sentencepiece}


def _from_gguf(path: str) -> HFTextTokenizer:
  from tokenizers import AddedToken, processors

  from gea_jax.interop.gguf_header import GGUFHeaderError, read_gguf_metadata

  try:
    meta = read_gguf_metadata(path)  # the header alone: gguf.GGUFReader would index every tensor too (~6 s)
  except GGUFHeaderError as e:
    raise TokenizerError(str(e)) from e
  kind = meta.get("tokenizer.ggml.model")
  if kind is None:
    raise TokenizerError(f"{path}: GGUF has no tokenizer (missing metadata key 'tokenizer.ggml.model')")
  if kind not in _GGUF_TOKENIZERS:
    raise TokenizerError(
      f"{path}: GGUF tokenizer type {kind!r} (tokenizer.ggml.model) is not supported; supported: "
      "'gpt2' (byte-level BPE), 'llama' (SentencePiece BPE)"
    )
  if "tokenizer.ggml.tokens" not in meta:
    raise TokenizerError(f"{path}: missing GGUF metadata key 'tokenizer.ggml.tokens'")
  tokens: list[str] = meta["tokenizer.ggml.tokens"]
  types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
  if len(types) != len(tokens):
    raise TokenizerError(
      f"{path}: tokenizer.ggml.token_type has {len(types)} entries, tokenizer.ggml.tokens has {len(tokens)}"
    )
  tok, addable = _GGUF_TOKENIZERS[kind](path, meta, tokens)
  # CONTROL tokens are special (kept whole, skippable on decode); USER_DEFINED ones are kept whole too.
  tok.add_special_tokens(
    [
      AddedToken(t, normalized=False, special=True)
      for t, ty in zip(tokens, types)
      if ty == _TOKEN_CONTROL and addable(t)
    ]
  )
  tok.add_tokens(
    [
      AddedToken(t, normalized=False, special=False)
      for t, ty in zip(tokens, types)
      if ty == _TOKEN_USER_DEFINED
    ]
  )

  def special(key: str) -> tuple[str | None, int | None]:
    i = meta.get(f"tokenizer.ggml.{key}")
    if i is None:
      return None, None
    if not 0 <= int(i) < len(tokens):
      raise TokenizerError(
        f"{path}: tokenizer.ggml.{key} = {i} is outside the vocabulary (size {len(tokens)})"
      )
    return tokens[int(i)], int(i)

  bos_token, bos_id = special("bos_token_id")
  eos_token, eos_id = special("eos_token_id")
  unk_token, _ = special("unknown_token_id")
  pad_token, pad_id = special("padding_token_id")
  # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
  if meta.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos_id is not None:
    tok.post_processor = processors.TemplateProcessing(
      single=f"{bos_token}:0 $A:0", pair=f"{bos_token}:0 $A:0 $B:1", special_tokens=[(bos_token, bos_id)]
    )
  return HFTextTokenizer(
    tok,
    source=path,
    vocab_size=max(len(tokens), tok.get_vocab_size(with_added_tokens=True)),
    bos_token=bos_token,
    eos_token=eos_token,
    bos_id=bos_id,
    eos_id=eos_id,
    pad_id=pad_id,
    chat_template=meta.get("tokenizer.chat_template"),
    special_tokens={"unk_token": unk_token, "pad_token": pad_token},
  )
