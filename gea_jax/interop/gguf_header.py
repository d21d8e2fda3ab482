"""A fast reader of a GGUF file's metadata key/values (its header), without indexing the tensors.

`gguf.GGUFReader` builds a numpy view for every part of every field before anything can be read: for
SmolLM2's 49,152-token vocabulary and 48,900 merges that is ~150,000 views and ~6 s, paid by every process that
loads the text tokenizer. This reads the same key/values straight from the header's bytes (~0.1 s) and returns
the Python values `gguf.ReaderField.contents()` gives (str, int, float, bool and lists of them); tested equal to
it on the real file (tests/test_tokenizers.py).

Format (GGUF v2/v3, little- or big-endian): magic "GGUF", uint32 version, uint64 tensor count, uint64 key/value
count, then per key/value: a string key (uint64 length + UTF-8 bytes), a uint32 value type and the value; an
array value is a uint32 item type, a uint64 count and the items.
"""

from __future__ import annotations

import os
import struct
from typing import Any

GGUF_MAGIC = b"GGUF"

# value type -> struct format of one scalar (8: string, 9: array are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class GGUFHeaderError(ValueError):
  """A GGUF header that cannot be read; the message names the file, the key and the byte offset."""


def read_gguf_metadata(path: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, Any]:
  """Every metadata key/value of the GGUF file at ``path`` (in file order), but those in ``skip``."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  with open(path, "rb") as f:
    head = f.read(24)
    if head[:4] != GGUF_MAGIC or len(head) < 24:
      raise GGUFHeaderError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {GGUF_MAGIC!r})")
    # the version is small: read little-endian, a big-endian file shows it in the high bytes
    order = "<" if struct.unpack_from("<I", head, 4)[0] < 0x10000 else ">"
    version, _, n_kv = struct.unpack_from(order + "IQQ", head, 4)
    if version < 2:
      raise GGUFHeaderError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    return _Reader(path, f, order).key_values(n_kv, set(skip))


class _Reader:
  """Reads the header in chunks: key/values are parsed from a buffer that is topped up from the file."""

  CHUNK = 1 << 22

  def __init__(self, path: str, f, order: str):
    self.path, self.f, self.order = path, f, order
    self.size = os.fstat(f.fileno()).st_size
    self.buf, self.pos, self.base = b"", 0, 24  # base: the file offset of buf[0]
    self.key = "<header>"

  def _need(self, n: int) -> None:
    if self.pos + n <= len(self.buf):
      return
    if self.base + self.pos + n > self.size:  # checked before reading: a damaged length may claim exabytes
      raise GGUFHeaderError(f"{self.path}: truncated GGUF header at byte {self.size} (reading key {self.key!r})")
    more = self.f.read(max(n, self.CHUNK))
    self.base += self.pos
    self.buf, self.pos = self.buf[self.pos:] + more, 0

  def _unpack(self, fmt: str):
    size = struct.calcsize(self.order + fmt)
    self._need(size)
    out = struct.unpack_from(self.order + fmt, self.buf, self.pos)
    self.pos += size
    return out

  def _string(self) -> str:
    (n,) = self._unpack("Q")
    self._need(n)
    raw = self.buf[self.pos:self.pos + n]
    self.pos += n
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise GGUFHeaderError(f"{self.path}: key {self.key!r}: a string that is not UTF-8 at byte "
                            f"{self.base + self.pos - n}") from e

  def _value(self, kind: int) -> Any:
    if kind == _STRING:
      return self._string()
    if kind == _ARRAY:
      item, count = self._unpack("IQ")
      if item == _STRING:
        return [self._string() for _ in range(count)]
      if item not in _SCALARS:
        raise GGUFHeaderError(f"{self.path}: key {self.key!r}: unsupported array item type {item}")
      self._need(count * struct.calcsize(self.order + _SCALARS[item]))  # a damaged count is named, not unpacked
      return list(self._unpack(f"{count}{_SCALARS[item]}"))
    if kind not in _SCALARS:
      raise GGUFHeaderError(f"{self.path}: key {self.key!r}: unknown value type {kind} at byte {self.base + self.pos}")
    return self._unpack(_SCALARS[kind])[0]

  def key_values(self, n_kv: int, skip: set[str]) -> dict[str, Any]:
    out = {}
    for _ in range(n_kv):
      self.key = "<key>"
      self.key = self._string()
      (kind,) = self._unpack("I")
      value = self._value(kind)
      if self.key not in skip:
        out[self.key] = value
    return out
