"""Character- and byte-level tokenizers, and value tokenizers for images and audio, saved as
JSON in the workdir."""

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from ar_jax.data import subword
from ar_jax.data.sources import decode_utf8
from ar_jax.errors import ConfigError, check

KINDS = ('char', 'byte', *subword.KINDS)
# Tokens that are numbers: sub-pixel values (data/images.py), mu-law audio levels
# (data/audio.py). Text reads and writes them as whitespace-separated integers.
VALUE_KINDS = ('pixel', 'mulaw')


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """Token i is the string vocab[i]; `eos_id`, when set, separates documents.

  Byte level: vocab is the 256 byte values and an end-of-sequence token. Character level:
  the characters of the training split, and an end-of-sequence token only when that split
  has several documents (a single text such as tiny shakespeare keeps nanoGPT's 65).
  """

  kind: str
  vocab: tuple[str, ...]
  eos_id: int | None

  @property
  def vocab_size(self) -> int:
    return len(self.vocab)

  @property
  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes each token stands for (0 for end-of-sequence): bits per byte counts these.
    A value (an 8-bit sub-pixel, a mu-law sample) is one byte."""
    if self.kind in VALUE_KINDS:
      sizes = np.ones(self.vocab_size, np.int32)
      if self.eos_id is not None:
        sizes[self.eos_id] = 0
      return sizes
    if self.kind == 'byte':
      sizes = [1] * 256
    else:
      sizes = [len(c.encode()) for c in self.vocab[: len(self.vocab) - (self.eos_id is not None)]]
    return np.array(sizes + [0] * (self.eos_id is not None), np.int32)

  def encode(self, text: str | bytes) -> np.ndarray:
    if self.kind in VALUE_KINDS:
      return self._encode_values(text if isinstance(text, str) else decode_utf8(text, 'text'))
    if self.kind == 'byte':
      raw = text.encode() if isinstance(text, str) else text
      return np.frombuffer(raw, np.uint8).astype(np.int32)
    if isinstance(text, bytes):
      text = decode_utf8(text, 'text')
    table = {c: i for i, c in enumerate(self.vocab) if i != self.eos_id}
    unknown = sorted(set(text) - table.keys())
    if unknown:
      raise ConfigError(
        f'character(s) {"".join(unknown)!r} are not in the vocabulary of {len(table)} '
        f'characters built from the training split: {"".join(sorted(table))!r}'
      )
    return np.array([table[c] for c in text], np.int32)

  def _encode_values(self, text: str) -> np.ndarray:
    """'0 12 255' -> [BOS, 0, 12, 255] (BOS where the kind has one: an image starts with it)."""
    levels = self.vocab_size - (self.eos_id is not None)
    try:
      values = [int(v) for v in text.split()]
    except ValueError as e:
      raise ConfigError(f'{self.kind} tokens are integers separated by spaces, got {text!r}') from e
    bad = [v for v in values if not 0 <= v < levels]
    check(not bad, f'{self.kind} values must be in [0, {levels}), got {bad[:5]}')
    bos = [] if self.eos_id is None else [self.eos_id]
    return np.array(bos + values, np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids if int(i) != self.eos_id]
    if self.kind in VALUE_KINDS:
      return ' '.join(map(str, ids))
    if self.kind == 'byte':
      return bytes(ids).decode('utf-8', errors='replace')
    return ''.join(self.vocab[i] for i in ids)

  def encode_documents(self, docs: Sequence[bytes], name: str) -> np.ndarray:
    """One token stream: the documents in order, each followed by eos when there is one."""
    parts = []
    for i, doc in enumerate(docs):
      try:
        parts.append(self.encode(doc if self.kind == 'byte' else decode_utf8(doc, f'{name}[{i}]')))
      except ConfigError as e:
        if self.kind != 'char':
          raise
        raise ConfigError(
          f"{name}[{i}]: {e}. A character vocabulary holds only the training split's "
          "characters: data.tokenizer='byte' reads any text"
        ) from e
      if self.eos_id is not None:
        parts.append(np.array([self.eos_id], np.int32))
    tokens = np.concatenate(parts)
    return tokens.astype(np.uint16 if self.vocab_size <= 1 << 16 else np.int32)

  def save(self, path: str) -> None:
    with open(path, 'w') as f:
      json.dump(dataclasses.asdict(self), f)


# Every tokenizer a run may have: characters, bytes and values (Tokenizer), or subwords.
AnyTokenizer = Tokenizer | subword.Subword


def needs_train_split(data) -> bool:
  """Whether config.data's tokenizer is built from the training split's documents."""
  return data.tokenizer == 'char' or (data.tokenizer in subword.KINDS and not data.tokenizer_path)


def from_config(data, train_docs: Sequence[bytes]) -> AnyTokenizer:
  """config.data's tokenizer: loaded from data.tokenizer_path, or built from the training
  split's documents (a subword one on their first data.tokenizer_train_bytes)."""
  check(data.tokenizer in KINDS, f'data.tokenizer={data.tokenizer!r}; allowed: {", ".join(KINDS)}')
  if data.tokenizer not in subword.KINDS:
    return build(data.tokenizer, train_docs)
  if data.tokenizer_path:
    loaded = subword.load(data.tokenizer_path, data.eos_token)
    check(
      loaded.kind == data.tokenizer,
      f'data.tokenizer_path={data.tokenizer_path} is a {loaded.kind} tokenizer, and '
      f'data.tokenizer={data.tokenizer!r}',
    )
    return loaded
  check(bool(train_docs), 'the training split is empty: there is nothing to train a tokenizer on')
  texts = subword.sample_texts(train_docs, data.tokenizer_train_bytes)
  if data.tokenizer == 'bpe':
    return subword.train_bpe(texts, data.vocab_size)
  return subword.train_sentencepiece(texts, data.vocab_size, data.sentencepiece_model_type)


def build(kind: str, train_docs: Sequence[bytes]) -> Tokenizer:
  """A character or byte tokenizer for the training split's documents."""
  check(kind in ('char', 'byte'), f'data.tokenizer={kind!r}; allowed: char, byte')
  if kind == 'byte':
    return Tokenizer('byte', tuple(chr(b) for b in range(256)) + ('<eos>',), eos_id=256)
  chars = set()
  for i, doc in enumerate(train_docs):
    chars.update(decode_utf8(doc, f'train[{i}]'))
  vocab = tuple(sorted(chars))
  if len(train_docs) > 1:
    return Tokenizer('char', vocab + ('<eos>',), eos_id=len(vocab))
  return Tokenizer('char', vocab, eos_id=None)


def values(kind: str, levels: int, bos: bool) -> Tokenizer:
  """Token v is the value v for v < levels; with bos, token `levels` starts every example."""
  check(kind in VALUE_KINDS, f'value tokenizer kind {kind!r}; allowed: {", ".join(VALUE_KINDS)}')
  vocab = tuple(str(v) for v in range(levels)) + (('<bos>',) if bos else ())
  return Tokenizer(kind, vocab, eos_id=levels if bos else None)


def load(path: str) -> AnyTokenizer:
  """A tokenizer a workdir saved (Tokenizer.save, Subword.save)."""
  with open(path) as f:
    d = json.load(f)
  if d['kind'] in subword.KINDS:
    return subword.Subword(**d)
  return Tokenizer(d['kind'], tuple(d['vocab']), d['eos_id'])
