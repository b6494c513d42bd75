"""Data: sources (TFDS, files, the embedded corpus) -> tokenizer -> token streams -> batches.

A text corpus is either tokenized into memory when a run starts (small corpora: the
quickstart, tiny shakespeare) or prepared once into a token store on disk (data.prepared,
ar_jax/data/store.py) that every run then streams by memory map. Images (data.tokenizer =
'pixel') and audio ('mulaw') are read as arrays, not text: their modules make the streams.
"""

import dataclasses
import os
from typing import Any

import numpy as np

from ar_jax.data import audio, images, sources, store, subword, tokenizers
from ar_jax.data.tokenizers import AnyTokenizer
from ar_jax.errors import check

PACKINGS = ('none', 'documents')


@dataclasses.dataclass(frozen=True)
class TokenStreams:
  tokenizer: AnyTokenizer
  train: np.ndarray | store.Tokens | None  # None when not asked for
  eval: dict[str, np.ndarray | store.Tokens]  # split name -> tokens; evaluation pools them


def load(
  data: Any, tokenizer: AnyTokenizer | None = None, *, train: bool = True, evaluation: bool = True
) -> TokenStreams:
  """Reads config.data's splits and tokenizes the ones asked for; builds the tokenizer unless
  given one (a character vocabulary reads the training split for it, tokenized or not).
  With data.prepared, the splits are the store's, prepared there first if it is not yet."""
  check(data.packing in PACKINGS, f'data.packing={data.packing!r}; allowed: {", ".join(PACKINGS)}')
  if data.tokenizer in tokenizers.VALUE_KINDS:
    check(
      data.packing == 'none',
      f"data.packing='documents' packs text documents; {data.tokenizer} data are whole examples",
    )
    module = images if data.tokenizer == 'pixel' else audio
    tokenizer, streams = module.load(data, tokenizer)
    return TokenStreams(
      tokenizer=tokenizer,
      train=streams[data.train_split] if train else None,
      eval={split: streams[split] for split in data.eval_splits} if evaluation else {},
    )
  prepared = bool(data.prepared) and store.read_manifest(data.prepared) is not None
  to_train = data.tokenizer in subword.KINDS and tokenizers.needs_train_split(data)
  if tokenizer is None and not (train or evaluation) and to_train and not prepared:
    # Compiling needs only the vocabulary's size: no corpus is read to train a tokenizer.
    return TokenStreams(tokenizers.untrained(data), None, {})
  # Compiling alone (no split asked for) never fills a store: that is a prepare's work.
  if data.prepared and (train or evaluation or prepared):
    tokenizer, splits, longest = _prepared(data, tokenizer)
    read = lambda split: splits[split]
  else:
    if tokenizer is None:
      tokenizer = tokenizers.from_config(data, sources.documents(data, data.train_split))
    encoded = {}

    def read(split):
      chunks = sources.documents(data, split)
      name = f'{data.name}:{split}'
      encoded[split] = tokenizers.encode(tokenizer, chunks, name, data.invalid_utf8)
      tokenizers.warn_skipped(name, encoded[split].skipped)
      return encoded[split].tokens

  streams = TokenStreams(
    tokenizer=tokenizer,
    train=read(data.train_split) if train else None,
    eval={split: read(split) for split in data.eval_splits} if evaluation else {},
  )
  if data.packing == 'documents':
    check(
      tokenizer.eos_id is not None,
      "data.packing='documents' needs an end-of-document token; this character vocabulary "
      'has none (its training split is one document)',
    )
    if train:
      if not data.prepared:
        longest = int(np.diff(encoded[data.train_split].ends, prepend=0).max(initial=0))
      check(
        longest >= data.seq_len + 1,
        f"data.packing='documents': a window of data.seq_len + 1 = {data.seq_len + 1} tokens "
        f'is longer than every training document (the longest has {longest}), so no position '
        f'past {longest} would ever be trained; lower data.seq_len',
      )
  return streams


def _prepared(data: Any, tokenizer: AnyTokenizer | None):
  """(tokenizer, split -> Tokens, the training split's longest document) of the store at
  data.prepared, prepared there first (by process 0) if it is not complete."""
  path = data.prepared
  manifest = store.read_manifest(path)
  if manifest is None:
    import jax  # Imported here: only filling a store on first use needs the processes.
    from jax.experimental import multihost_utils

    if jax.process_index() == 0:
      store.prepare(data, path, num_workers=os.cpu_count() or 1, tokenizer=tokenizer)
    multihost_utils.sync_global_devices(f'prepared {path}')
    manifest = store.read_manifest(path)
  stored = tokenizers.load(os.path.join(path, 'tokenizer.json'))
  expected, whose = tokenizer, "the run's (its workdir's tokenizer.json)"
  if expected is None and data.tokenizer_path:
    expected, whose = subword.load(data.tokenizer_path, data.eos_token), data.tokenizer_path
  if expected is not None:
    check(
      store.fingerprint(expected) == store.fingerprint(stored),
      f'the store {path} was prepared with a {store.describe(stored)}; {whose} is a '
      f'{store.describe(expected)}',
    )
  check(
    stored.kind == data.tokenizer,
    f'the store {path} was prepared with a {store.describe(stored)}; data.tokenizer='
    f'{data.tokenizer!r}',
  )
  wanted = [data.train_split, *data.eval_splits]
  missing = [s for s in wanted if s not in manifest['splits']]
  check(
    not missing,
    f'the store {path} has no split {", ".join(missing)}; it has {", ".join(manifest["splits"])}',
  )
  splits = {split: store.open_split(path, split, manifest) for split in wanted}
  return stored, splits, manifest['splits'][data.train_split]['longest_document']
