"""Where the text comes from: a TFDS dataset by name, local files by path (plain text, JSONL,
Parquet), or the embedded corpus of the Python standard library's own sources.

Every source streams each split as chunks (text bytes, whether the chunk ends a document), in
a fixed order, never holding more than one document (or one piece of a large file) at a
time: a corpus far larger than memory streams the same way as a small one. Tokenizers
decide what the bytes mean.
"""

import glob
import json
import os
import sysconfig
import zlib
from collections.abc import Iterator
from typing import Any

from ar_jax.errors import ConfigError, check

EMBEDDED = 'python_stdlib'
FILES = 'files'
SPLITS = ('train', 'validation')  # of files and the embedded corpus
# A plain-text file is read in pieces of about this many bytes, cut after a line break
# between non-space characters: byte-level BPE's pre-tokenizer splits there anyway, so the
# pieces tokenize as the whole text does, and character and byte tokens are unaffected.
PIECE_BYTES = 1 << 20

Chunk = tuple[bytes, bool]  # (text, ends its document)
RECORD_FILES = ('.jsonl', '.parquet')  # a document per record, its text in data.text_feature


def stdlib_pattern() -> str:
  """Every .py file of this interpreter's standard library, on every machine with Python."""
  return os.path.join(sysconfig.get_paths()['stdlib'], '**', '*.py')


def documents(data: Any, split: str) -> Iterator[Chunk]:
  """The chunks of one split of the dataset config.data names, in order; a ConfigError names
  a split that does not exist or holds no text (found when the stream ends)."""
  if data.name in (EMBEDDED, FILES):
    paths = _paths(data, split)
    chunks, where = _files(paths, split, data), f'{paths[0]}{" ..." * (len(paths) > 1)}'
  else:
    chunks, where = _tfds(data, split), f'TFDS dataset {data.name!r}'
  empty = True
  for text, end in chunks:
    empty = empty and not text
    yield text, end
  check(not empty, f'split {split!r} of {where} is empty')


def estimated_bytes(data: Any, split: str) -> int | None:
  """About how many bytes of text the split holds, for a progress line's ETA (None: unknown,
  as for TFDS). Record files count their share of all their bytes."""
  if data.name not in (EMBEDDED, FILES):
    return None
  paths = _paths(data, split)
  share = data.val_fraction if split == 'validation' else 1.0 - data.val_fraction
  if len(paths) == 1 or any(p.endswith(RECORD_FILES) for p in paths):
    return int(share * sum(map(os.path.getsize, paths)))
  root = os.path.commonpath(paths)
  return sum(
    os.path.getsize(p)
    for p in paths
    if _in_split(os.path.relpath(p, root), split, data.val_fraction)
  )


def _paths(data: Any, split: str) -> list[str]:
  check(split in SPLITS, f'split {split!r} does not exist for files; allowed: {SPLITS}')
  check(
    0.0 < data.val_fraction < 1.0, f'data.val_fraction must be in (0, 1), got {data.val_fraction}'
  )
  if data.name == EMBEDDED:
    return [p for p in _expand(stdlib_pattern()) if 'site-packages' not in p.split(os.sep)]
  check(bool(data.path), "data.name='files' needs data.path: a file, a directory or a glob")
  return _expand(data.path)


def _expand(path: str) -> list[str]:
  if os.path.isdir(path):
    path = os.path.join(path, '**', '*')
  paths = sorted(
    p for p in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(p)
  )
  check(bool(paths), f'data.path={path!r} matches no file')
  return paths


def _in_split(key: str, split: str, val_fraction: float) -> bool:
  """Held out by a hash of the key, so the split does not depend on the order or number of
  the other documents."""
  bucket = zlib.crc32(key.encode()) % 10_000
  return (bucket < val_fraction * 10_000) == (split == 'validation')


def _files(paths: list[str], split: str, data: Any) -> Iterator[Chunk]:
  """One plain-text file splits by position, as nanoGPT does (train = the first
  1 - val_fraction). Several split whole files, by a hash of their path relative to the
  common root, so the split does not depend on where the files live. Records of JSONL and
  Parquet files are documents, split by a hash of (file, record number)."""
  root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
  for path in paths:
    rel = os.path.relpath(path, root)
    if path.endswith(RECORD_FILES):
      for i, text in enumerate(_records(path, data.text_feature)):
        if _in_split(f'{rel}:{i}', split, data.val_fraction):
          yield text, True
    elif len(paths) == 1:
      size = os.path.getsize(path)
      cut = int((1.0 - data.val_fraction) * size)
      yield from _pieces(path, *((0, cut) if split == 'train' else (cut, size)))
    elif _in_split(rel, split, data.val_fraction):
      yield from _pieces(path, 0, os.path.getsize(path))


def _pieces(path: str, start: int, stop: int) -> Iterator[Chunk]:
  """Bytes [start, stop) of a file as one document, in pieces of about PIECE_BYTES."""
  with open(path, 'rb') as f:
    f.seek(start)
    left, carry = stop - start, b''
    while True:
      block = carry + f.read(min(left, PIECE_BYTES))
      left -= len(block) - len(carry)
      if left <= 0:
        yield block, True
        return
      cut = _safe_cut(block)
      yield block[:cut], False
      carry = block[cut:]


def _safe_cut(block: bytes) -> int:
  """The last place in block after a line break between two non-space characters (where
  byte-level BPE's pre-tokenizer cuts the text the same way, whole or in pieces); else the
  last UTF-8 character boundary (never inside a character)."""
  at = len(block) - 1
  while (at := block.rfind(b'\n', 0, at)) > 0:
    if not (block[at - 1 : at].isspace() or block[at + 1 : at + 2].isspace()):
      return at + 1
  at = len(block) - 1
  while at > 0 and 0x80 <= block[at] < 0xC0:  # a continuation byte: inside a character
    at -= 1
  return at


def _records(path: str, field: str) -> Iterator[bytes]:
  """The `field` text of every record of a JSONL or Parquet file, streamed."""
  if path.endswith('.parquet'):
    import pyarrow.parquet as pq  # Imported here: only Parquet sources need it.

    file = pq.ParquetFile(path)
    columns = file.schema_arrow.names
    check(field in columns, f'{path} has no column {field!r}; its columns: {", ".join(columns)}')
    for batch in file.iter_batches(columns=[field], batch_size=1024):
      for text in batch.column(0).to_pylist():
        yield (text or '').encode() if not isinstance(text, bytes) else text
    return
  with open(path, 'rb') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f'{path}:{n} is not JSON: {e}') from e
      check(
        isinstance(record, dict) and isinstance(record.get(field), str),
        f'{path}:{n} has no text field {field!r} (data.text_feature); it has: '
        f'{", ".join(record) if isinstance(record, dict) else type(record).__name__}',
      )
      yield record[field].encode()


def tfds_source(data: Any, split: str):
  """The random-access TFDS source of one split of data.name (also for data/images.py and
  data/audio.py), or a ConfigError that says why there is none."""
  import tensorflow_datasets as tfds  # Imported here: it is slow to import and not always needed.

  try:
    source = tfds.data_source(
      data.name, split=split, data_dir=data.data_dir or None, download=data.download
    )
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(
      f'unknown data.name={data.name!r}: not {EMBEDDED!r}, not {FILES!r}, and not a TFDS dataset'
    ) from e
  except Exception as e:  # TFDS raises many types for "not prepared here".
    where = data.data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(
      f'TFDS dataset {data.name!r} split {split!r} is not available under {where}: {reason}'
    ) from e
  return source


def _tfds(data: Any, split: str) -> Iterator[Chunk]:
  source = tfds_source(data, split)
  for i in range(len(source)):
    example = source[i]
    check(
      data.text_feature in example,
      f'TFDS dataset {data.name!r} has no feature {data.text_feature!r}; '
      f'its features: {", ".join(example)}',
    )
    text = example[data.text_feature]
    yield (text if isinstance(text, bytes) else str(text).encode()), True


def decode_utf8(
  raw: bytes, where: str, fix: str = "read it with data.tokenizer='byte' or fix the file"
) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ConfigError(
      f'{where} is not valid UTF-8 at byte {e.start} ({raw[e.start : e.start + 4]!r}); {fix}'
    ) from e
