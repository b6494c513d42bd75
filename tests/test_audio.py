"""Audio: mu-law quantisation, the synthetic source, TFDS audio when prepared, and a short
WaveNet run through the trainer (its end-of-run sample is Fast WaveNet decoding)."""

import numpy as np
import pytest

from ar_jax import data, train
from ar_jax.data import audio
from experiments import wavenet_audio


def test_mu_law_levels_and_round_trip():
  # f(x) = sign(x) ln(1 + 255 |x|) / ln(256), mapped from [-1, 1] onto levels 0 .. 255.
  np.testing.assert_array_equal(audio.mu_law_encode(np.array([-1.0, 0.0, 1.0])), [0, 128, 255])
  x = np.linspace(-1.0, 1.0, 10_001)
  q = audio.mu_law_encode(x)
  assert q.min() == 0 and q.max() == 255 and np.all(np.diff(q) >= 0)
  back = audio.mu_law_decode(q)
  # Rounding costs at most half a level, 1/255 in f: in x, that times dx/df, small near 0
  # (fine steps for quiet sounds) and large near +-1 (3% over the slope at x: curvature).
  dx_df = np.log1p(255) / 255 * (1 + 255 * np.abs(x))
  assert np.all(np.abs(back - x) <= 1.03 * dx_df / 255)
  np.testing.assert_array_equal(
    audio.mu_law_encode(audio.mu_law_decode(np.arange(256))), range(256)
  )


def test_synthetic_audio_is_deterministic_mu_law_streams():
  c = wavenet_audio.get_config('dataset=synthetic')
  streams = data.load(c.data)
  assert (streams.tokenizer.kind, streams.tokenizer.vocab_size) == ('mulaw', 256)
  clip = int(audio.SYNTHETIC_SECONDS * audio.SAMPLE_RATE)
  assert len(streams.train) == audio.SYNTHETIC_CLIPS['train'] * clip
  assert len(streams.eval['validation']) == audio.SYNTHETIC_CLIPS['validation'] * clip
  assert len(np.unique(streams.train)) > 200  # the notes use most of the levels
  np.testing.assert_array_equal(data.load(c.data).train, streams.train)
  assert not np.array_equal(streams.train[:clip], streams.eval['validation'][:clip])
  assert streams.tokenizer.decode(streams.tokenizer.encode('128 3')) == '128 3'


@pytest.mark.parametrize('name', ['speech_commands', 'nsynth'])
def test_tfds_audio_when_prepared(name, shared_data):
  tfds_dir = shared_data / 'tensorflow_datasets'
  if not (tfds_dir / name).is_dir():
    pytest.skip(f'TFDS {name} is not prepared under {tfds_dir}')
  c = wavenet_audio.get_config(f'dataset={name}')
  c.data.data_dir, c.data.max_examples = str(tfds_dir), 3
  streams = data.load(c.data)
  assert len(streams.train) > 1000 and streams.train.max() < 256


def test_wavenet_learns_synthetic_audio(tmp_path):
  c = wavenet_audio.get_config('dataset=synthetic')
  c.model.layers_per_block, c.model.channels = 6, 16  # receptive field 64
  c.model.skip_channels = c.model.head_channels = 32
  c.mesh.data = 1
  c.data.seq_len, c.batch_size = 128, 8
  c.num_train_steps, c.optim.warmup_steps, c.optim.learning_rate = 120, 5, 1e-2
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 120
  c.eval_batches, c.sample.max_new_tokens = 4, 32
  final = train.train_and_evaluate(c, str(tmp_path))
  # Uniform over 256 levels is 8 bits per sample (one mu-law byte). Each level has its own
  # embedding, so the net must first learn which levels are near which: slow at first.
  assert final['eval/bits_per_byte'] < 7.0, final
  sample = (tmp_path / 'samples.txt').read_text().splitlines()[-1].split()
  assert len(sample) == 33 and all(0 <= int(v) < 256 for v in sample)  # prompt + 32 samples
