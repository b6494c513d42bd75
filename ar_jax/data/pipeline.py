"""Token streams -> batches of windows [B, T + 1] (inputs are [:, :-1], targets [:, 1:]).

Training batches come from a grain MapDataset indexed by step: batch i depends only on
(seed, i), so the iterator state is one index, a resumed run sees exactly the batches an
uninterrupted one would, and the global batch does not depend on how many processes read
it (each process takes its own rows).
"""

from collections.abc import Iterator

import grain
import numpy as np

from ar_jax.errors import check

SAMPLINGS = ('random', 'sequential', 'examples')
_ENDLESS = 1 << 40  # more batches than any run takes; the iterator state is the index


def train_iterator(
  tokens: np.ndarray,
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
  window = seq_len + 1
  check(
    len(tokens) >= window * (batch_size if sampling == 'sequential' else 1),
    f'the training split has {len(tokens)} tokens, too few for '
    + (f'{batch_size} streams of ' if sampling == 'sequential' else 'one window of ')
    + f'seq_len + 1 = {window}',
  )
  check(
    sampling != 'examples' or len(tokens) % window == 0,
    f'the training split has {len(tokens)} tokens, not whole examples of seq_len + 1 = {window}',
  )
  local = batch_size // process_count
  rows = slice(process_index * local, (process_index + 1) * local)
  offsets = np.arange(window)

  if sampling == 'random':

    def starts(i):
      rng = np.random.default_rng([seed, i])
      return rng.integers(0, len(tokens) - window + 1, size=batch_size)[rows]

  elif sampling == 'examples':

    def starts(i):
      rng = np.random.default_rng([seed, i])
      return rng.integers(0, len(tokens) // window, size=batch_size)[rows] * window

  else:
    part = len(tokens) // batch_size
    windows_per_part = (part - 1) // seq_len

    def starts(i):
      return np.arange(batch_size)[rows] * part + (i % windows_per_part) * seq_len

  def make_batch(i):
    return tokens[starts(i)[:, None] + offsets].astype(np.int32)

  dataset = grain.MapDataset.range(_ENDLESS).map(make_batch)
  # One background thread keeps a few batches ready; more threads only contend for 2 cores.
  options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=16)
  return iter(dataset.to_iter_dataset(options))


def eval_batches(
  tokens: np.ndarray,
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

  Yields (tokens [B_local, seq_len + 1] int32, weights [B_local, seq_len] float32); weights
  are 0 on padding. max_batches > 0 stops early.
  """
  check(len(tokens) >= 2, f'an evaluation split has {len(tokens)} tokens; it needs at least 2')
  if examples:
    stride = seq_len + 1
    check(
      len(tokens) % stride == 0,
      f'an evaluation split has {len(tokens)} tokens, not whole examples of {stride}',
    )
    num_windows = len(tokens) // stride
    padded, valid = np.asarray(tokens, np.int32), np.ones(len(tokens), np.float32)
  else:
    stride = seq_len
    num_windows = -(-(len(tokens) - 1) // seq_len)
    padded = np.zeros(num_windows * seq_len + 1, np.int32)
    padded[: len(tokens)] = tokens
    valid = np.zeros(num_windows * seq_len, np.float32)
    valid[: len(tokens) - 1] = 1.0
  num_batches = -(-num_windows // batch_size)
  if max_batches > 0:
    num_batches = min(num_batches, max_batches)
  local = batch_size // process_count
  for b in range(num_batches):
    w = b * batch_size + process_index * local + np.arange(local)
    in_range = w < num_windows
    starts = np.where(in_range, w, 0) * stride
    batch = padded[starts[:, None] + np.arange(seq_len + 1)]
    weights = valid[starts[:, None] + np.arange(seq_len)] * in_range[:, None]
    yield batch, weights
