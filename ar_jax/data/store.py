"""A prepared token store: a corpus tokenized once into shards on disk and read by memory map,
so a process's memory does not grow with the corpus and each process reads only its rows.

A store directory holds:
  tokenizer.json          the tokenizer, as a workdir saves it
  spec.json               what is prepared (source, tokenizer fingerprint, shard size): a
                          prepare started again checks it is finishing the same store
  SPLIT-NNNNN.tokens.npy  a shard's tokens, its documents in order, each followed by eos
                          (uint16 when the vocabulary fits, else uint32)
  SPLIT-NNNNN.ends.npy    int64: the offset in the shard just past each document ending there
  SPLIT-NNNNN.json        the shard's counts, written last: present means complete
  manifest.json           every split's and shard's counts, written last: the store is done

Every file is written under a temporary name and renamed, so a prepare killed at any point
leaves nothing that looks complete and is not; started again, it skips the shards it
finished. Shards are cut from the source stream by text bytes, so their contents do not
depend on how many worker processes tokenize them.

Why flat .npy files read by np.memmap rather than array_record: training reads windows at
any token offset, across document boundaries. In a flat token array a window is one slice
(a page or two), where a record format addresses whole records, so a window would read and
join several. np.memmap needs nothing beyond numpy and shares the page cache between the
processes of a host.
"""

import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ar_jax.data import sources, tokenizers
from ar_jax.errors import ConfigError, RunError, check

log = logging.getLogger(__name__)

FORMAT = 1
SHARD_BYTES = 4 << 20  # text per shard: about a second of one core; the last few keep all busy
MANIFEST = 'manifest.json'
# The config.data fields a store's contents depend on, besides the tokenizer.
SOURCE_FIELDS = ('name', 'path', 'data_dir', 'text_feature', 'val_fraction', 'invalid_utf8')


def fingerprint(tok: tokenizers.AnyTokenizer) -> str:
  """A short hash of everything the tokenizer is: equal fingerprints tokenize alike."""
  text = json.dumps(dataclasses.asdict(tok), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(tok: tokenizers.AnyTokenizer) -> str:
  return f'{tok.kind} tokenizer of {tok.vocab_size} tokens (fingerprint {fingerprint(tok)})'


class Tokens:
  """One split's token stream, in shards (memory-mapped files, or one in-memory array),
  read by windows and never whole.

  A store's shards are checked as they are read: a token id outside the vocabulary (a shard
  changed after it was prepared) is named with its shard, not left to become a NaN loss."""

  def __init__(self, shards: Sequence[np.ndarray], vocab_size: int = 0, names: Sequence[str] = ()):
    self.shards = list(shards)
    self.ends = np.cumsum([len(s) for s in self.shards], dtype=np.int64)
    self.vocab_size = vocab_size  # 0: not checked (tokenized in memory by this process)
    self.names = list(names)

  def __len__(self) -> int:
    return int(self.ends[-1]) if len(self.ends) else 0

  def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
    """[len(starts), length] int32: tokens starts[r] .. starts[r] + length - 1 in row r,
    across shard boundaries; 0 past the end of the stream."""
    out = np.zeros((len(starts), length), np.int32)
    for r, start in enumerate(starts):
      pos, filled = int(start), 0
      while filled < length and pos < len(self):
        k = int(np.searchsorted(self.ends, pos, side='right'))
        offset = pos - (self.ends[k] - len(self.shards[k]))
        piece = self.shards[k][offset : offset + length - filled]
        if self.vocab_size and len(piece) and piece.max() >= self.vocab_size:
          self._out_of_vocabulary(k, offset, piece)
        out[r, filled : filled + len(piece)] = piece
        filled, pos = filled + len(piece), pos + len(piece)
    return out

  def _out_of_vocabulary(self, k: int, offset: int, piece: np.ndarray):
    at = int(np.argmax(piece >= self.vocab_size))
    raise RunError(
      f'{self.names[k] if self.names else f"shard {k}"} holds token id {int(piece[at])} at '
      f"offset {offset + at}, outside the tokenizer's {self.vocab_size} tokens: it was "
      'changed after it was prepared. Prepare the store again'
    )


def as_tokens(stream: 'Tokens | np.ndarray') -> Tokens:
  return stream if isinstance(stream, Tokens) else Tokens([stream])


def open_split(path: str, split: str, manifest: dict) -> Tokens:
  """The memory-mapped shards of one split, each checked against the manifest's count and
  largest token id (the ids themselves are checked as they are read)."""
  vocab = manifest['tokenizer']['vocab_size']
  shards, names = [], []
  for shard in manifest['splits'][split]['shards']:
    check(
      shard.get('max_id', 0) < vocab,
      f'store {path}: shard {shard["file"]} holds token ids up to {shard.get("max_id")}, '
      f"outside the tokenizer's {vocab} tokens. Prepare the store again",
    )
    file = os.path.join(path, shard['file'])
    names.append(f'store {path}: shard {shard["file"]}')
    try:
      tokens = np.load(file, mmap_mode='r')
    except (OSError, ValueError) as e:
      raise ConfigError(
        f'store {path}: shard {shard["file"]} is unreadable or truncated ({e}); the manifest '
        f'says {shard["tokens"]} tokens. Prepare the store again'
      ) from e
    check(
      len(tokens) == shard['tokens'],
      f'store {path}: shard {shard["file"]} has {len(tokens)} tokens, the manifest says '
      f'{shard["tokens"]}. Prepare the store again',
    )
    shards.append(tokens)
  return Tokens(shards, vocab, names)


def read_manifest(path: str) -> dict | None:
  file = os.path.join(path, MANIFEST)
  if not os.path.exists(file):
    return None
  with open(file) as f:
    return json.load(f)


def _write_json(path: str, value: Any) -> None:
  _atomic(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def _atomic(path: str, write) -> None:
  """Writes path through a temporary file, synced, then renamed: whole or absent. A write
  that fails (a full disk) removes its temporary file and says so in one line."""
  tmp = f'{path}.tmp'
  try:
    with open(tmp, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    folder = os.path.dirname(os.path.abspath(path))
    free = ''
    with contextlib.suppress(OSError):
      free = f'; {shutil.disk_usage(folder).free / 2**20:.1f} MiB free there'
    raise RunError(
      f'writing {path} failed ({e.strerror or e}){free}. Free space (or fix the path) and run '
      'the same prepare again: it keeps the shards it finished'
    ) from None


def _save(f, array: np.ndarray) -> None:
  """np.save's .npy file, written through Python's file object: a full disk is then an
  OSError that says so (numpy's own write reports only a short count)."""
  np.lib.format.write_array_header_1_0(f, np.lib.format.header_data_from_array_1_0(array))
  f.write(np.ascontiguousarray(array).tobytes())


def prepare(
  data: Any,
  out: str,
  *,
  num_workers: int = 1,
  shard_bytes: int = SHARD_BYTES,
  tokenizer: tokenizers.AnyTokenizer | None = None,
) -> dict:
  """Tokenizes config.data's training and eval splits into a store at `out` (see the module
  docstring) and returns its manifest. A store already complete is returned as it is; one
  half-written by the same spec is finished. The tokenizer is `tokenizer`, the one a
  half-written store saved, or config.data's (trained on the training split if need be)."""
  check(num_workers >= 1, f'--num_workers must be at least 1, got {num_workers}')
  os.makedirs(out, exist_ok=True)
  for name in os.listdir(out):  # what a prepare killed mid-write left
    if name.endswith('.tmp'):
      os.remove(os.path.join(out, name))
  tokenizer_file = os.path.join(out, 'tokenizer.json')
  if tokenizer is None and os.path.exists(tokenizer_file):
    tokenizer = tokenizers.load(tokenizer_file)
  if tokenizer is None:
    log.info('prepare: building the %s tokenizer from the training split', data.tokenizer)
    tokenizer = tokenizers.from_config(data, sources.documents(data, data.train_split))
  splits = list(dict.fromkeys([data.train_split, *data.eval_splits]))
  spec = {
    'format': FORMAT,
    'source': {k: data[k] for k in SOURCE_FIELDS},
    'splits': splits,
    'tokenizer': {'kind': tokenizer.kind, 'fingerprint': fingerprint(tokenizer)},
    'shard_bytes': shard_bytes,
  }
  spec_file = os.path.join(out, 'spec.json')
  if os.path.exists(spec_file):
    with open(spec_file) as f:
      saved = json.load(f)
    check(
      saved == spec,
      f'{out} holds a store prepared as {json.dumps(saved)}; this prepare is '
      f'{json.dumps(spec)}. Use another directory (or delete it)',
    )
  else:
    tokenizer.save(f'{tokenizer_file}.tmp')
    os.replace(f'{tokenizer_file}.tmp', tokenizer_file)
    _write_json(spec_file, spec)
  manifest = read_manifest(out)
  if manifest is not None:
    return manifest
  manifest = {
    **spec,
    'tokenizer': {**spec['tokenizer'], 'vocab_size': tokenizer.vocab_size},
    'dtype': tokenizers.token_dtype(tokenizer.vocab_size).name,
    'splits': {},
  }
  pool = (
    # Spawned, not forked: the subword libraries' thread pools do not survive a fork.
    concurrent.futures.ProcessPoolExecutor(
      num_workers,
      mp_context=multiprocessing.get_context('spawn'),
      initializer=_init_worker,
      initargs=(os.getpid(),),
    )
    if num_workers > 1
    else None
  )
  try:
    for split in splits:
      manifest['splits'][split] = _prepare_split(data, out, split, pool, num_workers, shard_bytes)
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
  _write_json(os.path.join(out, MANIFEST), manifest)
  log.info('prepare: %s is complete', out)
  return manifest


def _shards(chunks: Iterator[sources.Chunk], shard_bytes: int):
  """(index, first document, chunks) of consecutive shards of at least shard_bytes of text
  (the last may hold less), cut between chunks."""
  index, first, doc, batch, size = 0, 0, 0, [], 0
  for text, end in chunks:
    batch.append((text, end))
    size += len(text)
    doc += end
    if size >= shard_bytes:
      yield index, first, batch
      index, first, batch, size = index + 1, doc, [], 0
  if batch or index == 0:
    yield index, first, batch


def _prepare_split(data, out, split, pool, num_workers, shard_bytes) -> dict:
  from ar_jax.monitor import progress  # Imported here: the worker processes need no jax.

  name = f'{data.name}:{split}'
  total = sources.estimated_bytes(data, split)
  done, pending, start, last_log = {}, [], time.perf_counter(), 0.0
  read = reported = 0

  def report(final=False):
    nonlocal last_log, reported
    now = time.perf_counter()
    if (final and reported < len(done)) or now - last_log > 5:
      last_log, reported = now, len(done)
      rate = read / max(now - start, 1e-9)
      eta = f' | eta {progress.duration((total - read) / rate)}' if total and rate else ''
      log.info(
        'prepare %s: %s%.1f MB read, %d shards, %.2fM tokens | %.1f MB/s%s',
        split,
        f'{min(read / total, 1):.0%} | ' if total else '',
        read / 1e6,
        len(done),
        sum(s['tokens'] for s in done.values()) / 1e6,
        rate / 1e6,
        eta,
      )

  def collect(future):
    shard = future.result()
    done[shard['index']] = shard
    report()

  args = (out, split, name, data.invalid_utf8)
  for index, first, chunks in _shards(sources.documents(data, split), shard_bytes):
    read += sum(len(text) for text, _ in chunks)
    stem = os.path.join(out, f'{split}-{index:05d}')
    if os.path.exists(f'{stem}.json'):  # finished by an earlier prepare
      with open(f'{stem}.json') as f:
        done[index] = json.load(f)
      if 'max_id' not in done[index]:  # written before shards recorded it
        done[index]['max_id'] = int(np.load(f'{stem}.tokens.npy', mmap_mode='r').max(initial=0))
      continue
    if pool is None:
      future = concurrent.futures.Future()
      future.set_result(write_shard(*args, index, first, chunks))
      pending.append(future)
    else:
      pending.append(pool.submit(write_shard, *args, index, first, chunks))
    while pending and (pending[0].done() or len(pending) > num_workers + 1):
      collect(pending.pop(0))  # a bounded number of shards of text in flight
  while pending:
    collect(pending.pop(0))
  report(final=True)
  shards = [done[i] for i in sorted(done)]
  # Document lengths across shards: a document may start in one shard and end in another.
  ends = np.concatenate(
    [np.load(os.path.join(out, s['ends'])) + s['offset'] for s in _offsets(shards)]
  )
  lengths = np.diff(ends, prepend=0)
  tokenizers.warn_skipped(name, [d for s in shards for d in s['skipped']])
  return {
    'tokens': sum(s['tokens'] for s in shards),
    'documents': len(ends),
    'bytes': sum(s['bytes'] for s in shards),
    'longest_document': int(lengths.max(initial=0)),
    'skipped_documents': sum(len(s['skipped']) for s in shards),
    'shards': [
      {k: s[k] for k in ('file', 'tokens', 'max_id', 'documents', 'bytes')} for s in shards
    ],
  }


def _offsets(shards: list[dict]) -> list[dict]:
  offset, out = 0, []
  for s in shards:
    out.append({**s, 'offset': offset})
    offset += s['tokens']
  return out


def _init_worker(parent: int) -> None:
  """A worker tokenizes on one thread: the workers are the parallelism, and a subword
  library's own thread pool in each would only contend for the same cores. It gets SIGKILL
  when its parent dies (Linux's PR_SET_PDEATHSIG), so a prepare killed by kill -9 leaves no
  workers waiting forever on a queue nobody feeds; one whose parent died while it started
  exits at once."""
  os.environ['TOKENIZERS_PARALLELISM'] = 'false'
  with contextlib.suppress(OSError, AttributeError):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
  if os.getppid() != parent:
    os._exit(1)


@functools.cache
def _tokenizer(path: str) -> tokenizers.AnyTokenizer:
  return tokenizers.load(path)


def write_shard(out, split, name, invalid_utf8, index, first_document, chunks) -> dict:
  """Tokenizes one shard's chunks and writes its files (in a worker process, or inline)."""
  tok = _tokenizer(os.path.join(out, 'tokenizer.json'))
  encoded = tokenizers.encode(tok, chunks, name, invalid_utf8, first_document)
  stem = f'{split}-{index:05d}'
  _atomic(os.path.join(out, f'{stem}.tokens.npy'), lambda f: _save(f, encoded.tokens))
  _atomic(os.path.join(out, f'{stem}.ends.npy'), lambda f: _save(f, encoded.ends))
  shard = {
    'index': index,
    'file': f'{stem}.tokens.npy',
    'ends': f'{stem}.ends.npy',
    'tokens': len(encoded.tokens),
    'max_id': int(encoded.tokens.max(initial=0)),
    'documents': len(encoded.ends),
    'bytes': sum(len(text) for text, _ in chunks),
    'skipped': list(encoded.skipped),
  }
  _write_json(os.path.join(out, f'{stem}.json'), shard)
  return shard
