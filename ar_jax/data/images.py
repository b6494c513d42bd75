"""Images as token streams: every image is one example [BOS, x_1 .. x_N], its N = H * W * C
sub-pixel values in raster order (row by row, each pixel's channels in turn).

Sources: 'digits', scikit-learn's bundled 8 x 8 handwritten digits (no download; the
optional `images` extra), and any TFDS image dataset by name with an 'image' feature, read
from a prepared copy: mnist, binarized_mnist (values 0/1: data.pixel_levels = 2), cifar10.

Whole examples travel through the trainer's ordinary contract: the streams hold examples
back to back, training draws whole ones (data.sampling = 'examples') and evaluation reads
each once, so the mean token cross-entropy is the mean over sub-pixels (nats per dimension).
"""

from typing import Any

import numpy as np

from ar_jax.data import sources, tokenizers
from ar_jax.data.tokenizers import Tokenizer
from ar_jax.errors import check

DIGITS = 'digits'
FEATURE = 'image'  # the TFDS feature every image dataset names its image by


def load(data: Any, tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, dict[str, np.ndarray]]:
  """(the pixel tokenizer, {split: stream of whole examples}) for config.data's splits."""
  levels = data.pixel_levels
  if tokenizer is None:
    tokenizer = tokenizers.values('pixel', levels, bos=True)
  check(
    tokenizer.kind == 'pixel' and tokenizer.vocab_size == levels + 1,
    f'the tokenizer ({tokenizer.kind}, {tokenizer.vocab_size} tokens) is not the pixel '
    f'tokenizer of data.pixel_levels={levels} (and BOS)',
  )
  splits = [data.train_split, *data.eval_splits]
  images = read_digits(data, splits) if data.name == DIGITS else read_tfds(data, splits)
  return tokenizer, {split: examples(images[split], data, tokenizer) for split in splits}


def examples(images_NHWC: np.ndarray, data: Any, tokenizer: Tokenizer) -> np.ndarray:
  """The images as one stream of [BOS, sub-pixels] examples, checked against the config."""
  num, sub_pixels = images_NHWC.shape[0], int(np.prod(images_NHWC.shape[1:]))
  check(
    data.seq_len == sub_pixels,
    f'data.seq_len={data.seq_len}, but {data.name} images have {sub_pixels} sub-pixels '
    f'({"x".join(map(str, images_NHWC.shape[1:]))}): one example is BOS and all of them',
  )
  bos = tokenizer.eos_id  # = the number of levels: the values come first
  top = int(images_NHWC.max(initial=0))
  check(top < bos, f'{data.name} has the pixel value {top}, too large for data.pixel_levels={bos}')
  stream = np.empty((num, sub_pixels + 1), np.uint16)
  stream[:, 0] = bos
  stream[:, 1:] = images_NHWC.reshape(num, sub_pixels)
  return stream.reshape(-1)


def read_digits(data: Any, splits: list[str]) -> dict[str, np.ndarray]:
  """scikit-learn's 1,797 digits, 8 x 8 x 1 with values 0..16, stretched to 0..255 (16 -> 255).

  A fixed shuffle, then the last data.val_fraction of it is 'validation'.
  """
  try:
    from sklearn.datasets import load_digits  # An optional extra: pip install '.[images]'.
  except ImportError as e:
    raise ImportError("data.name='digits' needs scikit-learn: pip install 'ar_jax[images]'") from e
  allowed = ('train', 'validation')
  for split in splits:
    check(split in allowed, f'split {split!r} does not exist for digits; allowed: {allowed}')
  raw = load_digits().images
  images = np.round(raw * (255.0 / 16.0)).astype(np.uint8)[..., None]
  images = images[np.random.default_rng(0).permutation(len(images))]
  cut = int(round((1.0 - data.val_fraction) * len(images)))
  parts = {'train': images[:cut], 'validation': images[cut:]}
  return {split: _first(parts[split], data) for split in splits}


def read_tfds(data: Any, splits: list[str]) -> dict[str, np.ndarray]:
  """The FEATURE of every example (or the first data.max_examples) of each split, uint8."""
  out = {}
  for split in splits:
    source = sources.tfds_source(data, split)
    count = len(source) if data.max_examples <= 0 else min(len(source), data.max_examples)
    check(count > 0, f'TFDS dataset {data.name!r} split {split!r} is empty')
    first = source[0]
    check(
      FEATURE in first,
      f'TFDS dataset {data.name!r} has no feature {FEATURE!r}; its features: {", ".join(first)}',
    )
    out[split] = np.stack([np.asarray(source[i][FEATURE], np.uint8) for i in range(count)])
  return out


def _first(images: np.ndarray, data: Any) -> np.ndarray:
  return images if data.max_examples <= 0 else images[: data.max_examples]
