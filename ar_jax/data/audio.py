"""Audio as token streams: waveforms in [-1, 1], quantised to 256 mu-law levels (WaveNet).

Sources: 'synthetic_audio', decaying harmonic notes made from a seed (no download, for tests
and quick looks), and any TFDS audio dataset by name with an 'audio' feature, read from a
prepared copy (speech_commands, nsynth, ...). Integer samples are taken as 16-bit PCM. The
clips of a split are concatenated into one stream; training reads random windows of it.
"""

from typing import Any

import numpy as np

from ar_jax.data import sources, tokenizers
from ar_jax.data.tokenizers import Tokenizer
from ar_jax.errors import check

SYNTHETIC = 'synthetic_audio'
FEATURE = 'audio'  # the TFDS feature every audio dataset names its waveform by
LEVELS = 256  # 8-bit mu-law, as WaveNet
SAMPLE_RATE = 16_000  # of the synthetic clips (Hz)
SYNTHETIC_CLIPS = {'train': 64, 'validation': 8, 'test': 8}
SYNTHETIC_SECONDS = 0.5


def mu_law_encode(x: np.ndarray, levels: int = LEVELS) -> np.ndarray:
  """f(x) = sign(x) ln(1 + mu |x|) / ln(1 + mu), mu = levels - 1, rounded to 0 .. mu."""
  mu = levels - 1
  x = np.clip(np.asarray(x, np.float64), -1.0, 1.0)
  y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
  return np.round((y + 1.0) / 2.0 * mu).astype(np.int32)


def mu_law_decode(q: np.ndarray, levels: int = LEVELS) -> np.ndarray:
  """The inverse of mu_law_encode, up to its rounding: levels back to [-1, 1]."""
  mu = levels - 1
  y = 2.0 * np.asarray(q, np.float64) / mu - 1.0
  return np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu


def load(data: Any, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, dict[str, np.ndarray]]:
  """(the mu-law tokenizer, {split: one stream of every clip's levels}) for config.data."""
  if tokenizer is None:
    tokenizer = tokenizers.values('mulaw', LEVELS, bos=False)
  check(
    tokenizer.kind == 'mulaw' and tokenizer.vocab_size == LEVELS,
    f'the tokenizer ({tokenizer.kind}, {tokenizer.vocab_size} tokens) is not the mu-law one',
  )
  streams = {}
  for split in [data.train_split, *data.eval_splits]:
    clips = synthetic_clips(split) if data.name == SYNTHETIC else read_tfds(data, split)
    if data.max_examples > 0:
      clips = clips[: data.max_examples]
    streams[split] = np.concatenate([mu_law_encode(c) for c in clips]).astype(np.uint8)
  return tokenizer, streams


def synthetic_clips(split: str) -> list[np.ndarray]:
  """Notes of random pitch (110-880 Hz) with 3 harmonics and an exponential decay, and a
  little noise: structure at every time scale a small WaveNet can learn in minutes."""
  check(
    split in SYNTHETIC_CLIPS,
    f'split {split!r} does not exist for {SYNTHETIC}; allowed: {tuple(SYNTHETIC_CLIPS)}',
  )
  t = np.arange(int(SYNTHETIC_SECONDS * SAMPLE_RATE)) / SAMPLE_RATE
  clips = []
  for i in range(SYNTHETIC_CLIPS[split]):
    rng = np.random.default_rng([list(SYNTHETIC_CLIPS).index(split), i])
    f0, decay = rng.uniform(110.0, 880.0), rng.uniform(2.0, 8.0)
    wave = sum(np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h for h in (1, 2, 3))
    clip = 0.5 * np.exp(-decay * t) * wave + 0.01 * rng.standard_normal(len(t))
    clips.append(np.clip(clip, -1.0, 1.0))
  return clips


def read_tfds(data: Any, split: str) -> list[np.ndarray]:
  """Every clip's FEATURE (or the first data.max_examples) as floats in [-1, 1]."""
  source = sources.tfds_source(data, split)
  count = len(source) if data.max_examples <= 0 else min(len(source), data.max_examples)
  check(count > 0, f'TFDS dataset {data.name!r} split {split!r} is empty')
  check(
    FEATURE in source[0],
    f'TFDS dataset {data.name!r} has no feature {FEATURE!r}; its features: {", ".join(source[0])}',
  )
  clips = []
  for i in range(count):
    wave = np.asarray(source[i][FEATURE])
    wave = wave[:, 0] if wave.ndim > 1 else wave  # mono: the first channel
    # TFDS keeps PCM audio as integers (int16 values, often in an int64 array).
    clips.append(wave / 32768.0 if np.issubdtype(wave.dtype, np.integer) else wave)
  return clips
