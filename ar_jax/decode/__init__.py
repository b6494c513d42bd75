"""Decoding for any model family through its cached step: sampling (greedy, temperature,
top-k, top-p), beam search, and the teacher-forced score of given continuations."""

from ar_jax.decode.beam import length_penalty, search
from ar_jax.decode.sampling import (
  Generation,
  checked_lengths,
  filter_logits,
  generate,
  sample_images,
  sample_loop,
  sample_token,
)
from ar_jax.decode.scoring import score

__all__ = [
  'Generation',
  'checked_lengths',
  'filter_logits',
  'generate',
  'length_penalty',
  'sample_images',
  'sample_loop',
  'sample_token',
  'score',
  'search',
]
