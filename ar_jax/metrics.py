"""Evaluation numbers: a model's loss in the units it is reported in, and the quality and
diversity of its samples.

Likelihood: one total negative log-likelihood in nats, divided by the units that matter —
tokens (perplexity, bits per token), characters, UTF-8 bytes (counted from the text each
token stands for, not assumed), or image dimensions (sub-pixels).
Samples: corpus BLEU through sacrebleu, distinct-n and self-BLEU across samples, and the
repetition rate within each.
"""

import math
from collections.abc import Hashable, Sequence

import numpy as np
import sacrebleu

LN2 = math.log(2.0)


def perplexity(nats_per_token: float) -> float:
  """exp of the mean negative log-likelihood per token."""
  return math.exp(nats_per_token) if nats_per_token < 700 else math.inf


def bits_per_unit(total_nats: float, units: float) -> float:
  """Total negative log-likelihood in nats -> bits per unit (token, character, byte, dimension)."""
  return total_nats / LN2 / units


def byte_count(tokens: Sequence[int] | np.ndarray, token_bytes: np.ndarray) -> int:
  """UTF-8 bytes of the text the tokens stand for; token_bytes is the tokenizer's per-id table."""
  return int(np.asarray(token_bytes, np.int64)[np.asarray(tokens)].sum())


def bits_per_dim(nats_per_image: float, image_shape: Sequence[int]) -> float:
  """Bits per dimension of an image model: each sub-pixel (H * W * C of them) a dimension."""
  return bits_per_unit(nats_per_image, math.prod(image_shape))


def corpus_bleu(
  hypotheses: Sequence[str], references: Sequence[Sequence[str]], tokenize: str = '13a'
) -> float:
  """sacrebleu's corpus BLEU (0-100) of the hypotheses, each against its own references (the
  same number for every hypothesis)."""
  counts = {len(r) for r in references}
  if len(references) != len(hypotheses) or len(counts) != 1:
    raise ValueError(
      f'{len(hypotheses)} hypotheses need as many lists of references, all of one length; got '
      f'{len(references)} lists of lengths {sorted(counts)}'
    )
  # sacrebleu wants one stream per reference slot, each aligned with the hypotheses.
  streams = [list(slot) for slot in zip(*references, strict=True)]
  return sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize=tokenize).score


def self_bleu(samples: Sequence[str], tokenize: str = '13a') -> float:
  """Mean sentence BLEU (0-100) of each sample against all the others (Zhu et al. 2018,
  Texygen): high when samples resemble one another, so lower means more diverse."""
  if len(samples) < 2:
    raise ValueError(f'self-BLEU needs at least two samples, got {len(samples)}')
  bleu = sacrebleu.BLEU(tokenize=tokenize, effective_order=True)
  scores = [
    bleu.sentence_score(s, [*samples[:i], *samples[i + 1 :]]).score for i, s in enumerate(samples)
  ]
  return float(np.mean(scores))


def _ngrams(sequence: Sequence[Hashable], n: int) -> list[tuple]:
  return [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]


def distinct_n(sequences: Sequence[Sequence[Hashable]], n: int) -> float:
  """Distinct n-grams over all n-grams, pooled across the samples (Li et al. 2016).

  Sequences are tokens of any kind: token ids, characters, or words (text.split()).
  """
  grams = [g for s in sequences for g in _ngrams(s, n)]
  return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequences: Sequence[Sequence[Hashable]], n: int = 4) -> float:
  """Share of each sample's n-grams that repeat an earlier one of the same sample, averaged
  over samples with at least one n-gram (seq-rep-n, Welleck et al. 2020)."""
  rates = [1.0 - len(set(g)) / len(g) for g in (_ngrams(s, n) for s in sequences) if g]
  return float(np.mean(rates)) if rates else 0.0
