"""Metrics: hand-checkable values, sacrebleu's own numbers, and the conversions between units."""

import math

import numpy as np
import pytest
import sacrebleu

from ar_jax import metrics
from ar_jax.data import tokenizers


def test_bleu_of_a_hand_checked_pair():
  # Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3 and no brevity penalty (6 words each).
  bleu = metrics.corpus_bleu(['the cat sat on the mat'], [['the cat sat on a mat']])
  assert bleu == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25)
  # Five words against six: precisions 4/5, 3/4, 2/3, 1/2 and brevity penalty exp(1 - 6/5).
  short = metrics.corpus_bleu(['the cat sat on the'], [['the cat sat on a mat']])
  assert short == pytest.approx(100 * math.exp(1 - 6 / 5) * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_bleu_equals_sacrebleu_on_a_fixed_corpus_with_two_references_each():
  hypotheses = [
    'It is a guide to action which ensures that the military always obeys the commands.',
    'The cat was found under the bed, and it seemed quite happy there.',
    'He read the book because he was interested in world history.',
  ]
  references = [
    [
      'It is a guide to action that ensures that the military will forever heed commands.',
      'It is the guiding principle which guarantees the military forces always being under '
      'the command of the party.',
    ],
    ['The cat was under the bed.', 'Under the bed, the cat seemed happy.'],
    ['He was interested in world history because he read the book.', 'He read the book.'],
  ]
  ours = metrics.corpus_bleu(hypotheses, references)
  streams = [[r[0] for r in references], [r[1] for r in references]]
  assert ours == pytest.approx(sacrebleu.corpus_bleu(hypotheses, streams).score, abs=1e-9)
  assert 10 < ours < 90
  with pytest.raises(ValueError, match='all of one length'):
    metrics.corpus_bleu(hypotheses, [*references[:2], ['one reference only']])


def test_perplexity_and_bits_agree():
  # A uniform model over 50 tokens: ln 50 nats, log2 50 bits, perplexity 50 per token.
  nats_per_token, tokens = math.log(50), 1000
  total = nats_per_token * tokens
  assert metrics.perplexity(nats_per_token) == pytest.approx(50)
  assert metrics.bits_per_unit(total, tokens) == pytest.approx(math.log2(50))
  assert 2 ** metrics.bits_per_unit(total, tokens) == pytest.approx(
    metrics.perplexity(total / tokens)
  )
  assert metrics.perplexity(1e4) == math.inf
  # A 32x32 RGB image model: bits per dimension divide by the 3072 sub-pixels.
  assert metrics.bits_per_dim(3072 * math.log(2) * 3.5, (32, 32, 3)) == pytest.approx(3.5)


def test_bits_per_byte_count_the_bytes_each_token_covers():
  text = 'café, naïve, 東京'  # 15 characters, 21 UTF-8 bytes
  tokenizer = tokenizers.build('char', [text.encode(), b'x'])  # two documents: an eos token
  tokens = np.append(tokenizer.encode(text), tokenizer.eos_id)
  assert metrics.byte_count(tokens, tokenizer.token_bytes) == len(text.encode()) == 21
  total = 2.0 * len(tokens)  # 2 nats per token
  per_char = metrics.bits_per_unit(total, len(text))
  per_byte = metrics.bits_per_unit(total, metrics.byte_count(tokens, tokenizer.token_bytes))
  assert per_byte == pytest.approx(per_char * 15 / 21)
  byte_level = tokenizers.build('byte', [])
  assert metrics.byte_count(byte_level.encode(text), byte_level.token_bytes) == 21


def test_distinct_n_self_bleu_and_repetition():
  samples = ['a b c d', 'a b c e', 'x y z w']
  words = [s.split() for s in samples]
  assert metrics.distinct_n(words, 1) == pytest.approx(9 / 12)  # a, b, c repeat once each
  assert metrics.distinct_n(words, 2) == pytest.approx(7 / 9)  # 'a b', 'b c' repeat
  assert metrics.self_bleu(['the same words here'] * 3) == pytest.approx(100)
  assert metrics.self_bleu(['a b c d', 'e f g h', 'i j k l']) == 0
  assert 0 < metrics.self_bleu(samples) < 100
  # 'a b a b a b': 5 bigrams, 2 distinct -> 3/5 repeat; 'a b c': none repeat.
  assert metrics.repetition_rate([list('ababab'), list('abc')], n=2) == pytest.approx(0.3)
