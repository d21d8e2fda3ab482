"""Text tokenizers: SmolLM2's GGUF tokenizer against transformers', HF directories, SentencePiece, errors."""

import json
import os
import struct

import gguf
import pytest
import sentencepiece as spm
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from gea_jax.interop.gguf import smollm2_path
from gea_jax.interop.tokenizers import TokenizerError, load_text_tokenizer

TEXTS = [
  "Hello world",
  "What is the capital of France?",
  "  leading spaces and trailing  ",
  "Numbers: 12345 3.14159 -42 1,000,000 2024-11-21 0x1F 1e-5",
  "ünïcödé — “quotes” 日本語のテキスト 😀🚀 Привет мир ΑΒΓ",
  "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
  "tabs\tand\nnewlines\r\n\n\nend",
  "def f(x):\n    return x**2  # comment",
  "I'm you're they'll we'd it's DON'T",
  "<|endoftext|><repo_name>x<file_sep>",
  "a  b   c    d",
  "<|im_start|",
  "x<|im_end|>y",
  "",
]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2_tokenizers():
  path = smollm2_path()
  ours = load_text_tokenizer(path)
  ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
  return ours, ref


def test_gguf_tokenizer_equals_transformers(smollm2_tokenizers):
  ours, ref = smollm2_tokenizers
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False), text
    assert ours.encode(text, add_special_tokens=True) == ref.encode(text), text
    assert ours.decode(ids) == ref.decode(ids), text
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert ours.decode(ids) == text  # byte-level BPE is lossless


def test_gguf_tokenizer_special_tokens(smollm2_tokenizers):
  ours, ref = smollm2_tokenizers
  assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
  assert ours.vocab_size == len(ref) == 49152
  assert ours.encode("<|im_start|>") == [1] and ours.encode("<|im_end|>") == [2]
  # Single digits, as SmolLM2's tokenizer splits numbers.
  assert [ours.id_to_token(i) for i in ours.encode("2024")] == ["2", "0", "2", "4"]
  assert ours.decode(ours.encode("<|im_start|>hi<|im_end|>"), skip_special_tokens=True) == "hi"


def test_gguf_chat_template_equals_transformers(smollm2_tokenizers):
  ours, ref = smollm2_tokenizers
  text = ours.apply_chat_template(MESSAGES)
  assert text == ref.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
  assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
  chat = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
  ]
  assert ours.apply_chat_template(chat, add_generation_prompt=False) == ref.apply_chat_template(
    chat, tokenize=False, add_generation_prompt=False
  )


def test_gguf_tokenizer_saved_as_hf_dir(tmp_path, smollm2_tokenizers):
  """The rebuilt tokenizer, written as tokenizer.json, loads back here and in transformers identically."""
  ours, _ = smollm2_tokenizers
  ours.save_pretrained(tmp_path)
  again = load_text_tokenizer(tmp_path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in TEXTS:
    assert again.encode(text) == ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    assert again.decode(ours.encode(text)) == text
  assert (again.bos_id, again.eos_id, again.vocab_size) == (1, 2, 49152)
  assert again.apply_chat_template(MESSAGES) == ours.apply_chat_template(MESSAGES)
  assert hf.apply_chat_template(
    MESSAGES, tokenize=False, add_generation_prompt=True
  ) == ours.apply_chat_template(MESSAGES)


def _train_tokenizer_json(directory, config=None):
  tok = Tokenizer(models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  corpus = ["the cat sat on the mat", "the dog ate the cat food", "a mat for the dog"] * 20
  tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]", "<s>", "</s>"]))
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  if config is not None:
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
      json.dump(config, f)
  return tok


def test_hf_dir_tokenizer_json(tmp_path):
  template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
  template += "{% if add_generation_prompt %}[assistant] {% endif %}"
  ref = _train_tokenizer_json(
    tmp_path,
    {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "chat_template": template},
  )
  tok = load_text_tokenizer(tmp_path)
  assert tok.bos_id == ref.token_to_id("<s>") and tok.eos_id == ref.token_to_id("</s>")
  assert tok.vocab_size == ref.get_vocab_size()
  for text in ["the cat sat", "a dog on the mat", "the mat"]:
    assert tok.encode(text) == ref.encode(text).ids
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text).ids)
  assert tok.apply_chat_template(MESSAGES) == "[user] What is the capital of France?</s>[assistant] "
  # A tokenizer.json path works too, and chat_template.jinja is read when the config has none.
  os.remove(tmp_path / "tokenizer_config.json")
  (tmp_path / "chat_template.jinja").write_text(template)
  tok2 = load_text_tokenizer(tmp_path / "tokenizer.json")
  assert (
    tok2.apply_chat_template(MESSAGES, add_generation_prompt=False) == "[user] What is the capital of France?"
  )
  assert tok2.bos_id is None  # nothing says which token is BOS


def test_hf_dir_bad_special_token_is_named(tmp_path):
  _train_tokenizer_json(tmp_path, {"bos_token": "<bos-not-here>"})
  with pytest.raises(TokenizerError, match=r"tokenizer_config\.json.*bos_token '<bos-not-here>'"):
    load_text_tokenizer(tmp_path)


SP_TEXTS = [
  "The lazy dog",
  "ünïcödé 日本 😀",
  "digits 0123456789",
  "Hello\nworld",
  "fox, box; jugs!",
  "  two  spaces ",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  """A Llama-style SentencePiece BPE model (byte fallback, identity normalization) trained here."""
  tmp = tmp_path_factory.mktemp("sp")
  corpus = tmp / "corpus.txt"
  corpus.write_text(
    ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen jugs.\n") * 100
  )
  spm.SentencePieceTrainer.train(
    input=str(corpus),
    model_prefix=str(tmp / "sp"),
    vocab_size=320,
    model_type="bpe",
    byte_fallback=True,  # Llama-style: unseen characters become byte tokens
    character_coverage=1.0,
    normalization_rule_name="identity",  # Llama-style: no NFKC, keep whitespace as it is
    remove_extra_whitespaces=False,
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    minloglevel=2,
  )
  return tmp / "sp.model"


def test_sentencepiece_round_trip(sp_model):
  path = sp_model
  tok = load_text_tokenizer(path)
  proc = spm.SentencePieceProcessor(model_file=str(path))
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 320)
  for text in [
    "The lazy dog",
    "ünïcödé 日本 😀",
    "digits 0123456789",
    "Hello\nworld",
    "fox, box; jugs!",
    "  two  spaces ",
  ]:
    ids = tok.encode(text)
    assert ids == proc.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == [1] + ids
    assert tok.decode([1] + ids + [2], skip_special_tokens=True) == text
  assert [tok.id_to_token(i) for i in tok.encode("The lazy dog")] == proc.encode("The lazy dog", out_type=str)
  with pytest.raises(TokenizerError, match="no chat template"):
    tok.apply_chat_template(MESSAGES)


def test_missing_path_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="absent.gguf"):
    load_text_tokenizer(tmp_path / "absent.gguf")


def test_unknown_format_is_named(tmp_path):
  p = tmp_path / "vocab.txt"
  p.write_text("hello\nworld\n")
  with pytest.raises(TokenizerError, match=r"vocab\.txt: unknown tokenizer format"):
    load_text_tokenizer(p)
  bad = tmp_path / "broken.gguf"
  bad.write_bytes(b"ZZZZ" + bytes(64))
  with pytest.raises(TokenizerError, match=r"broken\.gguf: not a GGUF file"):
    load_text_tokenizer(bad)
  bad_sp = tmp_path / "tokenizer.model"
  bad_sp.write_bytes(b"\x00garbage")
  with pytest.raises(TokenizerError, match=r"tokenizer\.model: not a SentencePiece model"):
    load_text_tokenizer(bad_sp)
  empty = tmp_path / "emptydir"
  empty.mkdir()
  with pytest.raises(TokenizerError, match="no tokenizer.json"):
    load_text_tokenizer(empty)


def _write_gguf(path, **tokenizer):
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_block_count(1)
  for key, value in tokenizer.items():
    getattr(w, f"add_{key}")(value)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_without_or_with_unsupported_tokenizer_is_named(tmp_path):
  p = tmp_path / "weights-only.gguf"
  _write_gguf(p)
  with pytest.raises(
    TokenizerError, match=r"weights-only\.gguf: GGUF has no tokenizer.*tokenizer\.ggml\.model"
  ):
    load_text_tokenizer(p)
  q = tmp_path / "odd-pre.gguf"
  _write_gguf(q, tokenizer_model="gpt2", tokenizer_pre="mystery", token_list=["a", "b"], token_merges=["a b"])
  with pytest.raises(TokenizerError, match=r"odd-pre\.gguf: GGUF pre-tokenizer 'mystery'"):
    load_text_tokenizer(q)
  r = tmp_path / "unigram.gguf"
  _write_gguf(r, tokenizer_model="t5", token_list=["a", "b"])
  with pytest.raises(TokenizerError, match=r"unigram\.gguf: GGUF tokenizer type 't5'"):
    load_text_tokenizer(r)
  s = tmp_path / "no-scores.gguf"
  _write_gguf(s, tokenizer_model="llama", token_list=["a", "b"])
  with pytest.raises(TokenizerError, match=r"no-scores\.gguf: tokenizer\.ggml\.scores"):
    load_text_tokenizer(s)


def test_gguf_sentencepiece_vocab_equals_sentencepiece(tmp_path, sp_model):
  """A GGUF with llama.cpp's "llama" (SentencePiece) tokenizer, written from a real .model, tokenizes
  as SentencePiece does; and as transformers' GGUF tokenizer does, except for text starting with a space
  (transformers' Metaspace drops the dummy prefix there; llama.cpp and SentencePiece keep it)."""
  proc = spm.SentencePieceProcessor(model_file=str(sp_model))
  n = proc.get_piece_size()
  kinds = [
    2 if proc.is_unknown(i) else 3 if proc.is_control(i) else 6 if proc.is_byte(i) else 1 for i in range(n)
  ]
  path = tmp_path / "spm.gguf"
  _write_gguf(
    path,
    tokenizer_model="llama",
    token_list=[proc.id_to_piece(i) for i in range(n)],
    token_scores=[proc.get_score(i) for i in range(n)],
    token_types=kinds,
    bos_token_id=1,
    eos_token_id=2,
    unk_token_id=0,
  )
  tok = load_text_tokenizer(path)
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, n)
  for text in SP_TEXTS + ["Thequickbrownfox", ""]:
    ids = tok.encode(text)
    assert ids == proc.encode(text), text
    assert tok.decode(ids) == proc.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == [1] + ids  # llama.cpp adds BOS by default here
    if not text.startswith(" "):
      assert ids == ref.encode(text, add_special_tokens=False), text
      assert tok.encode(text, add_special_tokens=True) == ref.encode(text), text
  assert tok.encode("</s>") == [2]  # control tokens in the text stay whole


def _reader_metadata(path):
  """gguf's own reader's key/values, without its pseudo-keys for the header's counts (GGUF.version, ...)."""
  from gea_jax.interop.gguf import gguf_metadata, open_gguf
  return {k: v for k, v in gguf_metadata(open_gguf(path)).items() if not k.startswith("GGUF.")}


def test_gguf_header_reader_equals_ggufs_reader(tmp_path):
  """The fast header reader (what the tokenizer loads from) gives gguf.GGUFReader's key/values, in order: on the
  real SmolLM2 file and on a file with every value type, big-endian too."""
  from gea_jax.interop.gguf_header import read_gguf_metadata
  real = smollm2_path()
  got, want = read_gguf_metadata(real), _reader_metadata(real)
  assert list(got) == list(want) and got == want
  assert len(got["tokenizer.ggml.tokens"]) == 49152
  assert "tokenizer.ggml.tokens" not in read_gguf_metadata(real, skip=("tokenizer.ggml.tokens",))
  for endian in (gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG):
    path = tmp_path / f"types-{endian.name}.gguf"
    w = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    for i, kind in enumerate(("uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64")):
      w.add_key_value(f"t.{kind}", 7 * (i + 1) if kind.startswith("u") else -7 * (i + 1),
                      getattr(gguf.GGUFValueType, kind.upper()))
    w.add_float32("t.f32", 0.1)
    w.add_float64("t.f64", -2.5e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "ünïcödé ✓")
    w.add_array("t.ints", [1, -2, 3])
    w.add_array("t.floats", [0.5, 1.25])
    w.add_array("t.strs", ["a", "", "日本"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    got, want = read_gguf_metadata(path), _reader_metadata(path)
    assert list(got) == list(want) and got == want, endian
    assert got["t.f32"] == pytest.approx(0.1) and got["t.strs"] == ["a", "", "日本"] and got["t.int8"] == -14


def test_gguf_header_errors_name_the_file_and_key(tmp_path):
  from gea_jax.interop.gguf_header import GGUFHeaderError, read_gguf_metadata
  whole = open(smollm2_path(), "rb").read(200_000)  # the header runs into the vocabulary's strings
  cut = tmp_path / "cut.gguf"
  cut.write_bytes(whole)
  with pytest.raises(GGUFHeaderError, match=r"cut\.gguf: truncated GGUF header at byte \d+ \(reading key "
                                            r"'tokenizer\.ggml\.tokens'\)"):
    read_gguf_metadata(cut)
  with pytest.raises(TokenizerError, match=r"cut\.gguf: truncated GGUF header"):
    load_text_tokenizer(cut)
  # a damaged array count (2^60 uint32 items) is named, not unpacked
  huge = tmp_path / "huge.gguf"
  huge.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 1 << 60))
  with pytest.raises(GGUFHeaderError, match=r"huge\.gguf: truncated GGUF header at byte \d+ \(reading key 'k'\)"):
    read_gguf_metadata(huge)
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"GGUF" + bytes(2))
  with pytest.raises(GGUFHeaderError, match=r"bad\.gguf: not a GGUF file"):
    read_gguf_metadata(bad)
  with pytest.raises(FileNotFoundError, match="absent.gguf"):
    read_gguf_metadata(tmp_path / "absent.gguf")
