"""Data: sources (TFDS, files, the embedded corpus) -> tokenizer -> token streams -> batches.

Images (data.tokenizer = 'pixel') and audio ('mulaw') are read as arrays, not text: their
modules make the streams.
"""

import dataclasses
from typing import Any

import numpy as np

from ar_jax.data import audio, images, sources, tokenizers
from ar_jax.data.tokenizers import AnyTokenizer


@dataclasses.dataclass(frozen=True)
class TokenStreams:
  tokenizer: AnyTokenizer
  train: np.ndarray | None  # None when not asked for
  eval: dict[str, np.ndarray]  # split name -> tokens; evaluation pools all splits


def load(
  data: Any, tokenizer: AnyTokenizer | None = None, *, train: bool = True, evaluation: bool = True
) -> TokenStreams:
  """Reads config.data's splits and tokenizes the ones asked for; builds the tokenizer unless
  given one (a character vocabulary reads the training split for it, tokenized or not)."""
  if data.tokenizer in tokenizers.VALUE_KINDS:
    module = images if data.tokenizer == 'pixel' else audio
    tokenizer, streams = module.load(data, tokenizer)
    return TokenStreams(
      tokenizer=tokenizer,
      train=streams[data.train_split] if train else None,
      eval={split: streams[split] for split in data.eval_splits} if evaluation else {},
    )
  build = tokenizer is None and tokenizers.needs_train_split(data)
  wanted = [data.train_split] * (train or build) + list(data.eval_splits) * evaluation
  docs = sources.load_splits(data, list(dict.fromkeys(wanted))) if wanted else {}
  if tokenizer is None:
    tokenizer = tokenizers.from_config(data, docs.get(data.train_split, []))
  encode = lambda split: tokenizer.encode_documents(docs[split], f'{data.name}:{split}')
  return TokenStreams(
    tokenizer=tokenizer,
    train=encode(data.train_split) if train else None,
    eval={split: encode(split) for split in data.eval_splits} if evaluation else {},
  )
