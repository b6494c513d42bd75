"""Images as whole examples: the digits source, the pixel tokenizer, example batches, TFDS
images when prepared, and a short PixelCNN run on the digits in bits per dimension."""

import json
import math

import numpy as np
import pytest

from ar_jax import data, train
from ar_jax.data import batches, tokenizers
from ar_jax.errors import ConfigError
from experiments import pixelcnn


def digits_config(**overrides):
  c = pixelcnn.get_config('dataset=digits')
  for key, value in overrides.items():
    c.data[key] = value
  return c


def test_digits_are_whole_examples_of_bos_and_sub_pixels():
  streams = data.load(digits_config().data)
  tok = streams.tokenizer
  assert (tok.kind, tok.vocab_size, tok.eos_id) == ('pixel', 257, 256)
  train_EX = streams.train.reshape(-1, 65)
  eval_EX = streams.eval['validation'].reshape(-1, 65)
  assert (len(train_EX), len(eval_EX)) == (1617, 180)  # 1,797 images, 10% held out
  assert np.all(train_EX[:, 0] == 256) and np.all(eval_EX[:, 0] == 256)
  # Values 0..16 stretched to 0..255: 17 levels, both ends used.
  values = np.unique(train_EX[:, 1:])
  assert len(values) == 17 and values[0] == 0 and values[-1] == 255
  # No image is in both splits, and the split does not change between loads.
  assert not {r.tobytes() for r in train_EX} & {r.tobytes() for r in eval_EX}
  np.testing.assert_array_equal(data.load(digits_config().data).train, streams.train)


def test_examples_sampling_draws_whole_images_and_evaluates_each_once():
  streams = data.load(digits_config(max_examples=50).data)
  it = batches.train_iterator(streams.train, batch_size=8, seq_len=64, seed=0, sampling='examples')
  batch = next(it)
  assert batch.shape == (8, 65) and np.all(batch[:, 0] == 256)
  assert np.all(batch[:, 1:] < 256)
  tokens = streams.eval['validation']  # the first 50 validation images
  seen = list(batches.eval_batches(tokens, batch_size=16, seq_len=64, examples=True))
  assert len(seen) == 4  # 50 images in batches of 16: the last one padded
  rows = np.concatenate([b for b, _ in seen])
  weights = np.concatenate([w for _, w in seen])
  np.testing.assert_array_equal(rows[:50].reshape(-1), tokens)
  assert weights[:50].all() and not weights[50:].any()


def test_pixel_tokenizer_reads_and_writes_values():
  tok = tokenizers.values('pixel', 256, bos=True)
  ids = tok.encode('0 17 255')
  assert ids.tolist() == [256, 0, 17, 255]  # an image prompt starts with BOS
  assert tok.decode(ids) == '0 17 255'
  assert tok.encode('').tolist() == [256]
  assert tok.token_bytes.tolist() == [1] * 256 + [0]  # bits per byte = bits per dim
  with pytest.raises(ConfigError, match=r'pixel values must be in \[0, 256\), got \[256\]'):
    tok.encode('1 256')


@pytest.mark.parametrize(
  'overrides, message',
  [
    (dict(seq_len=63), 'data.seq_len=63, but digits images have 64 sub-pixels'),
    (dict(pixel_levels=2), 'digits has the pixel value 255, too large for data.pixel_levels=2'),
  ],
)
def test_image_data_that_does_not_fit_the_config_is_named(overrides, message):
  with pytest.raises(ConfigError, match=message):
    data.load(digits_config(**overrides).data)


@pytest.mark.parametrize('name', ['mnist', 'binarized_mnist', 'cifar10'])
def test_tfds_images_when_prepared(name, shared_data):
  tfds_dir = shared_data / 'tensorflow_datasets'
  if not (tfds_dir / name).is_dir():
    pytest.skip(f'TFDS {name} is not prepared under {tfds_dir}')
  c = pixelcnn.get_config(f'dataset={name}')
  c.data.data_dir, c.data.max_examples = str(tfds_dir), 20
  streams = data.load(c.data)
  examples_EX = streams.train.reshape(20, -1)
  assert examples_EX.shape[1] == c.data.seq_len + 1
  assert np.all(examples_EX[:, 0] == c.data.pixel_levels)  # BOS follows the levels
  assert examples_EX[:, 1:].max() < c.data.pixel_levels


def test_pixelcnn_on_digits_learns_well_below_8_bits_per_dim(tmp_path, optimised):
  c = pixelcnn.get_config('dataset=digits')
  c.model.features, c.model.num_layers, c.model.head_features = 16, 3, 32
  c.mesh.data = 1
  c.num_train_steps, c.optim.warmup_steps = 60, 10
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 60
  final = train.train_and_evaluate(c, str(tmp_path))
  # Uniform over 256 levels is 8 bits; over the 17 the digits use, 4.09. A model that learns
  # the strokes goes well below both.
  assert final['eval/bits_per_dim'] < 3.0, final
  assert final['eval/tokens'] == 180 * 64  # every validation sub-pixel, once
  assert math.isclose(final['eval/nats_per_image'], final['eval/loss'] * 64)
  logged = [json.loads(x) for x in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert any('eval/bits_per_dim' in m for m in logged)
  sample = (tmp_path / 'samples.txt').read_text().splitlines()[-1].split()
  assert len(sample) == 64 and all(0 <= int(v) < 256 for v in sample)  # one whole image
