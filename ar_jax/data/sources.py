"""Where the text comes from: a TFDS dataset by name, local files by path, or the embedded
corpus of the Python standard library's own sources. Every source gives, per split, a list
of documents as bytes; tokenizers decide what the bytes mean.
"""

import glob
import os
import sysconfig
import zlib
from typing import Any

from ar_jax.errors import ConfigError, check

EMBEDDED = 'python_stdlib'
FILES = 'files'


def stdlib_pattern() -> str:
  """Every .py file of this interpreter's standard library, on every machine with Python."""
  return os.path.join(sysconfig.get_paths()['stdlib'], '**', '*.py')


def load_splits(data: Any, splits: list[str]) -> dict[str, list[bytes]]:
  """Documents for each requested split of the dataset config.data names."""
  if data.name == EMBEDDED:
    paths = [p for p in _expand(stdlib_pattern()) if 'site-packages' not in p.split(os.sep)]
    return _split_files(paths, splits, data.val_fraction)
  if data.name == FILES:
    check(bool(data.path), "data.name='files' needs data.path: a file, a directory or a glob")
    return _split_files(_expand(data.path), splits, data.val_fraction)
  return {split: _tfds_documents(data, split) for split in splits}


def _expand(path: str) -> list[str]:
  if os.path.isdir(path):
    path = os.path.join(path, '**', '*')
  paths = sorted(
    p for p in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(p)
  )
  check(bool(paths), f'data.path={path!r} matches no file')
  return paths


def _split_files(
  paths: list[str], splits: list[str], val_fraction: float
) -> dict[str, list[bytes]]:
  """One file splits by position, as nanoGPT does (train = the first 1 - val_fraction);
  several split whole files, by a hash of their path relative to the common root, so the
  split does not depend on where the files live or on how many there are."""
  allowed = ('train', 'validation')
  for split in splits:
    check(split in allowed, f'split {split!r} does not exist for files; allowed: {allowed}')
  check(0.0 < val_fraction < 1.0, f'data.val_fraction must be in (0, 1), got {val_fraction}')
  if len(paths) == 1:
    text = _read(paths[0])
    cut = int((1.0 - val_fraction) * len(text))
    docs = {'train': [text[:cut]], 'validation': [text[cut:]]}
  else:
    root = os.path.commonpath(paths)
    docs = {'train': [], 'validation': []}
    for path in paths:
      bucket = zlib.crc32(os.path.relpath(path, root).encode()) % 10_000
      docs['validation' if bucket < val_fraction * 10_000 else 'train'].append(_read(path))
  for split in splits:
    check(any(docs[split]), f'split {split!r} of {paths[0]}{" ..." * (len(paths) > 1)} is empty')
  return {split: docs[split] for split in splits}


def _read(path: str) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


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


def _tfds_documents(data: Any, split: str) -> list[bytes]:
  docs = []
  for example in tfds_source(data, split):
    check(
      data.text_feature in example,
      f'TFDS dataset {data.name!r} has no feature {data.text_feature!r}; '
      f'its features: {", ".join(example)}',
    )
    text = example[data.text_feature]
    docs.append(text if isinstance(text, bytes) else str(text).encode())
  check(bool(docs), f'TFDS dataset {data.name!r} split {split!r} is empty')
  return docs


def decode_utf8(
  raw: bytes, where: str, fix: str = "read it with data.tokenizer='byte' or fix the file"
) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise ConfigError(
      f'{where} is not valid UTF-8 at byte {e.start} ({raw[e.start : e.start + 4]!r}); {fix}'
    ) from e
