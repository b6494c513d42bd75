"""Character- and byte-level tokenizers, and value tokenizers for images and audio, saved as
JSON in the workdir."""

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence

import numpy as np

from ar_jax.data import subword
from ar_jax.data.sources import Chunk, decode_utf8
from ar_jax.errors import ConfigError, check

log = logging.getLogger(__name__)

KINDS = ('char', 'byte', *subword.KINDS)
INVALID_UTF8 = ('error', 'skip')
# Text per call into a subword library: enough for its thread pool to balance across cores.
ENCODE_BATCH_CHARS = 8 << 20  # data.invalid_utf8: a text document that is not UTF-8
# Tokens that are numbers: sub-pixel values (data/images.py), mu-law audio levels
# (data/audio.py). Text reads and writes them as whitespace-separated integers.
VALUE_KINDS = ('pixel', 'mulaw')
# What one token is, where it is a unit that losses are quoted in (bits per character, bits
# per image dimension); every kind's loss is also quoted per UTF-8 byte (token_bytes).
UNITS = {'char': 'char', 'pixel': 'dim'}


def unit(tok: 'AnyTokenizer') -> str | None:
  """'char', 'dim' (a sub-pixel), or None where a token is no such unit (bytes, subwords)."""
  return UNITS.get(tok.kind)


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

  def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
    return [self.encode(text) for text in texts]

  def save(self, path: str) -> None:
    with open(path, 'w') as f:
      json.dump(dataclasses.asdict(self), f)


# Every tokenizer a run may have: characters, bytes and values (Tokenizer), or subwords.
AnyTokenizer = Tokenizer | subword.Subword


def needs_train_split(data) -> bool:
  """Whether config.data's tokenizer is built from the training split's documents."""
  return data.tokenizer == 'char' or (data.tokenizer in subword.KINDS and not data.tokenizer_path)


def from_config(data, train_chunks: Iterable[Chunk]) -> AnyTokenizer:
  """config.data's tokenizer: loaded from data.tokenizer_path, or built from the training
  split's chunks (read only if needed; a subword one reads the first
  data.tokenizer_train_bytes)."""
  check(data.tokenizer in KINDS, f'data.tokenizer={data.tokenizer!r}; allowed: {", ".join(KINDS)}')
  check(
    data.invalid_utf8 in INVALID_UTF8,
    f'data.invalid_utf8={data.invalid_utf8!r}; allowed: {", ".join(INVALID_UTF8)}',
  )
  texts = lambda: (text for text, _ in train_chunks)
  if data.tokenizer not in subword.KINDS:
    return build(data.tokenizer, texts() if needs_train_split(data) else (), data.invalid_utf8)
  if data.tokenizer_path:
    loaded = subword.load(data.tokenizer_path, data.eos_token)
    check(
      loaded.kind == data.tokenizer,
      f'data.tokenizer_path={data.tokenizer_path} is a {loaded.kind} tokenizer, and '
      f'data.tokenizer={data.tokenizer!r}',
    )
    return loaded
  sample = list(subword.sample_texts(texts(), data.tokenizer_train_bytes))
  check(any(sample), 'the training split is empty: there is nothing to train a tokenizer on')
  if data.tokenizer == 'bpe':
    return subword.train_bpe(iter(sample), data.vocab_size)
  return subword.train_sentencepiece(iter(sample), data.vocab_size, data.sentencepiece_model_type)


def build(kind: str, train_texts: Iterable[bytes], invalid_utf8: str = 'error') -> Tokenizer:
  """A character or byte tokenizer for the training split's texts (one per document)."""
  check(kind in ('char', 'byte'), f'data.tokenizer={kind!r}; allowed: char, byte')
  if kind == 'byte':
    return Tokenizer('byte', tuple(chr(b) for b in range(256)) + ('<eos>',), eos_id=256)
  chars, documents = set(), 0
  for i, text in enumerate(train_texts):
    documents += 1
    try:
      chars.update(decode_utf8(text, f'train[{i}]'))
    except ConfigError:
      if invalid_utf8 != 'skip':
        raise
  vocab = tuple(sorted(chars))
  if documents > 1:
    return Tokenizer('char', vocab + ('<eos>',), eos_id=len(vocab))
  return Tokenizer('char', vocab, eos_id=None)


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A stream of documents as tokens, each followed by eos when the tokenizer has one."""

  tokens: np.ndarray  # uint16 when the vocabulary fits, else uint32
  ends: np.ndarray  # int64 [documents]: the offset just past each document (and its eos)
  skipped: tuple[int, ...]  # documents left out as not UTF-8 (data.invalid_utf8='skip')


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def encode(
  tok: AnyTokenizer,
  chunks: Iterable[Chunk],
  name: str,
  invalid_utf8: str = 'error',
  first_document: int = 0,
) -> Encoded:
  """The chunks of a split (sources.documents) as one token stream; document i is named
  name[first_document + i] in errors. A document that is not UTF-8 stops it, or with
  invalid_utf8='skip' is left out (a piece of a large file, if only that piece is bad), and
  listed in the result for the caller to report (warn_skipped).
  Texts are encoded in batches: a subword library encodes a batch on all cores."""
  parts, ends, skipped, pending = [], [], [], []
  length = pending_chars = 0

  def flush():
    nonlocal length, pending_chars
    texts = [text for text, _, _ in pending]
    try:
      encoded = tok.encode_texts(texts) if tok.kind != 'byte' else texts
    except ConfigError as e:  # a character outside the vocabulary: find whose, and say why
      doc = next(d for t, _, d in pending if _fails(tok, t))
      raise ConfigError(
        f"{name}[{doc}]: {e}. A character vocabulary holds only the training split's "
        "characters: data.tokenizer='byte' reads any text"
      ) from e
    for ids, (_, end, _) in zip(encoded, pending, strict=True):
      parts.append(np.frombuffer(ids, np.uint8) if tok.kind == 'byte' else ids)
      length += len(ids)
      if end:
        if tok.eos_id is not None:
          parts.append(np.array([tok.eos_id]))
          length += 1
        ends.append(length)
    pending.clear()
    pending_chars = 0

  doc, has_text = first_document, False
  for raw, end in chunks:
    text = raw if tok.kind == 'byte' else _utf8(raw, f'{name}[{doc}]', invalid_utf8)
    if text is None and skipped[-1:] != [doc]:
      skipped.append(doc)
    has_text = has_text or text is not None
    if text is not None or (end and has_text):  # a document wholly left out leaves no eos
      pending.append((text if text is not None else '', end and has_text, doc))
      pending_chars += len(pending[-1][0])
    if end:
      doc, has_text = doc + 1, False
    if pending_chars >= ENCODE_BATCH_CHARS:
      flush()
  flush()
  dtype = token_dtype(tok.vocab_size)
  tokens = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
  return Encoded(tokens, np.asarray(ends, np.int64), tuple(skipped))


def warn_skipped(name: str, skipped: Sequence[int]) -> None:
  """One warning line for the documents of a split that encode() left out."""
  if skipped:
    log.warning(
      'left out %d document(s) of %s that are not UTF-8 (data.invalid_utf8=skip): %s',
      len(skipped),
      name,
      ', '.join(f'[{d}]' for d in skipped[:5]) + ' ...' * (len(skipped) > 5),
    )


def _utf8(raw: bytes, where: str, invalid_utf8: str) -> str | None:
  try:
    return decode_utf8(raw, where)
  except ConfigError:
    if invalid_utf8 == 'skip':
      return None
    raise


def _fails(tok: AnyTokenizer, text: str) -> bool:
  try:
    tok.encode(text)
    return False
  except ConfigError:
    return True


def untrained(data) -> Tokenizer:
  """Stands in for the subword tokenizer config.data would train, where only its size
  matters (compiling a train step): data.vocab_size tokens, end of document first, as
  train_bpe places it. It encodes nothing."""
  return Tokenizer(data.tokenizer, ('<|endoftext|>',) + ('',) * (data.vocab_size - 1), eos_id=0)


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
