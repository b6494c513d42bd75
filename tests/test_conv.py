"""The causal-conv LM and WaveNet: causality and receptive field by gradients, Fast WaveNet."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ar_jax import decode, models
from ar_jax.errors import ConfigError
from ar_jax.models.families import conv
from experiments import shakespeare_char
from tests.helpers import position_jacobian

V = 11
PLAIN = dict(dilation_base=1, gated=False, skip_channels=0, kernel_size=3, layers_per_block=3)
WAVENET = dict(kernel_size=2, layers_per_block=3, num_blocks=2)  # dilations 1 2 4 1 2 4
VARIANTS = {'plain': PLAIN, 'wavenet': WAVENET, 'wavenet_k3': dict(WAVENET, kernel_size=3)}


def make(**fields):
  base = dict(name='conv', channels=8, skip_channels=12, head_channels=32)
  model = models.get_model(ml_collections.ConfigDict({**base, **fields}), V)
  params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((2, 3), jnp.int32))['params'])
  return model, params


@pytest.mark.parametrize('variant', VARIANTS)
def test_causal_and_receptive_field_by_gradients(variant):
  """d logits[t] / d embeddings[s] is non-zero exactly for t - receptive_field < s <= t (the
  contract suite checks causality alone)."""
  model, params = make(**VARIANTS[variant])
  T = 32
  # Several rows and a wide head: a ReLU dead at one position for every row would hide it.
  tokens = jax.random.randint(jax.random.key(0), (4, T), 0, V)
  per_position_TS = position_jacobian(model, params, tokens)
  t, s = np.indices((T, T))
  inside = (s <= t) & (s > t - model.receptive_field)
  assert model.receptive_field < T  # the window's far edge is inside the sequence
  assert np.all(per_position_TS[~inside] == 0.0)
  assert np.all(per_position_TS[inside] > 0.0)


def test_receptive_field_is_the_formula():
  # (kernel_size - 1) * sum(dilations) + 1: kernel 2 doubles it with every dilated layer.
  assert conv.Config(vocab_size=V, layers_per_block=10).receptive_field == 1024
  assert conv.Config(vocab_size=V, layers_per_block=12).receptive_field == 4096
  assert (
    conv.Config(vocab_size=V, layers_per_block=10, num_blocks=3).receptive_field == 3 * 1023 + 1
  )
  assert conv.Config(vocab_size=V, kernel_size=3, layers_per_block=4).receptive_field == 2 * 15 + 1
  assert conv.Config(vocab_size=V, **PLAIN).receptive_field == 2 * 3 + 1
  assert make(**WAVENET)[0].config.dilations == (1, 2, 4, 1, 2, 4)


@pytest.mark.parametrize('preset', ['nanogpt_cpu', 'nanogpt_gpu'])
def test_text_variants_see_their_window(preset):
  """model=wavenet sees the whole training window (and more); model=conv a fixed 33."""
  for variant, field in (('wavenet', None), ('conv', 33)):
    c = shakespeare_char.get_config(f'preset={preset},model={variant}')
    model = models.get_model(c.model, 65)
    if field is None:
      assert c.data.seq_len < model.receptive_field <= 2 * c.data.seq_len
    else:
      assert model.receptive_field == field and not model.config.gated


def test_fast_wavenet_samples_equal_naive_recomputation_sample_for_sample():
  model, params = make(**WAVENET)
  prompt = jax.random.randint(jax.random.key(2), (3, 4), 0, V)
  kwargs = dict(num_new=30, temperature=1.0)
  fast = decode.sample_loop(model, params, prompt, jax.random.key(7), cached=True, **kwargs)
  naive = decode.sample_loop(model, params, prompt, jax.random.key(7), cached=False, **kwargs)
  np.testing.assert_array_equal(fast, naive)
  assert fast.shape == (3, 34)
  assert len(np.unique(np.asarray(fast[:, 4:]))) > 3  # really sampled, not one repeated token
  other = decode.sample_loop(model, params, prompt, jax.random.key(8), cached=True, **kwargs)
  assert not np.array_equal(fast, other)  # the keys decide the draws


def test_the_shared_decoder_drives_the_queues():
  """decode.generate through the model contract: greedy equals the naive argmax."""
  model, params = make(**WAVENET)
  prompt = jax.random.randint(jax.random.key(2), (2, 5), 0, V)
  greedy = decode.generate(model, params, prompt, 12, jax.random.key(0), temperature=0.0)
  naive = decode.sample_loop(
    model, params, prompt, jax.random.key(0), num_new=12, cached=False, temperature=0.0
  )
  np.testing.assert_array_equal(greedy.tokens, naive)


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(kernel_size=1), 'model.kernel_size must be >= 2'),
    (dict(channels=0), 'model.channels must be positive, got 0'),
    (dict(dilation_base=0), 'model.dilation_base must be >= 1, got 0'),
    (dict(skip_channels=-1), 'model.skip_channels must be >= 0, got -1'),
  ],
)
def test_bad_configs_are_named(fields, message):
  with pytest.raises(ConfigError, match=message):
    make(**fields)
