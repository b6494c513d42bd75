"""Token streams -> batches of windows [B, T + 1] (inputs are [:, :-1], targets [:, 1:]).

A stream is an in-memory array or a store's memory-mapped shards (store.Tokens); either is
read by windows, so a process's memory does not grow with the corpus. Training batches come
from a grain MapDataset indexed by step: batch i depends only on (seed, i), so the iterator
state is one index, a resumed run sees exactly the batches an uninterrupted one would, and
the global batch does not depend on how many processes read it (each process reads only its
own rows).
"""

from collections.abc import Iterator

import grain
import numpy as np

from ar_jax.data.store import Tokens, as_tokens
from ar_jax.errors import check

SAMPLINGS = ('random', 'sequential', 'examples')
_ENDLESS = 1 << 40  # more batches than any run takes; the iterator state is the index


def train_iterator(
  stream: Tokens | np.ndarray,
  *,
  batch_size: int,
  seq_len: int,
  seed: int,
  sampling: str,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.DatasetIterator:
  """Batches [batch_size / process_count, seq_len + 1] of int32, this process's rows.

  sampling='random': every row a window at a uniformly random offset, as nanoGPT samples.
  sampling='sequential': the stream cut into batch_size contiguous parts; row r of batch i
  is window i of part r, so consecutive batches continue each row's text (for stateful,
  truncated-BPTT training), wrapping around at the end of a part.
  sampling='examples': the stream is whole examples of seq_len + 1 tokens each (an image: BOS
  and its sub-pixels); every row is one of them, drawn uniformly.
  """
  check(sampling in SAMPLINGS, f'data.sampling={sampling!r}; allowed: {", ".join(SAMPLINGS)}')
  check(
    batch_size % process_count == 0,
    f'batch_size={batch_size} is not divisible by the {process_count} processes',
  )
  tokens, window = as_tokens(stream), seq_len + 1
  n = len(tokens)
  check(
    n >= window * (batch_size if sampling == 'sequential' else 1),
    f'the training split has {n} tokens, too few for '
    + (f'{batch_size} streams of ' if sampling == 'sequential' else 'one window of ')
    + f'seq_len + 1 = {window}',
  )
  check(
    sampling != 'examples' or n % window == 0,
    f'the training split has {n} tokens, not whole examples of seq_len + 1 = {window}',
  )
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)

  if sampling == 'random':

    def starts(i):
      rng = np.random.default_rng([seed, i])
      return rng.integers(0, n - window + 1, size=batch_size)[rows]

  elif sampling == 'examples':

    def starts(i):
      rng = np.random.default_rng([seed, i])
      return rng.integers(0, n // window, size=batch_size)[rows] * window

  else:
    part = n // batch_size
    windows_per_part = (part - 1) // seq_len

    def starts(i):
      return np.arange(batch_size)[rows] * part + (i % windows_per_part) * seq_len

  dataset = grain.MapDataset.range(_ENDLESS).map(lambda i: tokens.windows(starts(i), window))
  # One background thread keeps a few batches ready; more threads only contend for 2 cores.
  options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)
  return iter(dataset.to_iter_dataset(options))


def eval_batches(
  stream: Tokens | np.ndarray,
  *,
  batch_size: int,
  seq_len: int,
  max_batches: int = 0,
  process_index: int = 0,
  process_count: int = 1,
  examples: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Consecutive windows that predict every token of the split after the first exactly once;
  with examples=True, the split's whole examples of seq_len + 1 tokens, every target of each.
  Read batch by batch: the split is never loaded whole.

  Yields (tokens [B_local, seq_len + 1] int32, weights [B_local, seq_len] float32); weights
  are 0 on padding. max_batches > 0 stops early.
  """
  tokens = as_tokens(stream)
  n = len(tokens)
  check(n >= 2, f'an evaluation split has {n} tokens; it needs at least 2')
  if examples:
    stride = seq_len + 1
    check(n % stride == 0, f'an evaluation split has {n} tokens, not whole examples of {stride}')
    num_windows = n // stride
  else:
    stride = seq_len
    num_windows = -(-(n - 1) // seq_len)
  num_batches = -(-num_windows // batch_size)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  local = batch_size // process_count
  for b in range(num_batches):
    w = b * batch_size + process_index * local + np.arange(local)
    in_range = w < num_windows
    starts = np.where(in_range, w, 0) * stride
    # Target t of a window is token start + t + 1: a weight only where that token exists.
    targets = starts[:, None] + 1 + np.arange(seq_len)
    weights = ((targets < n) & in_range[:, None]).astype(np.float32)
    yield tokens.windows(starts, seq_len + 1), weights


def segments(tokens_BT, eos_id: int | None) -> dict:
  """The model's keyword arguments for packed documents ({} when eos_id is None): segment t of
  a row counts the eos tokens at or before t, so an eos starts the next document (as its
  beginning-of-sequence) and a document's first prediction sees nothing of the one before.
  numpy or jax arrays alike."""
  if eos_id is None:
    return {}
  return {'segment_ids_BT': (tokens_BT == eos_id).cumsum(axis=1, dtype='int32')}
