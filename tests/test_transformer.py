import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ar_jax import models
from ar_jax.errors import ConfigError
from ar_jax.models import layers

V = 13


def make(**fields):
  base = dict(name='transformer', num_layers=2, num_heads=2, d_model=16, max_len=24)
  model = models.get_model(ml_collections.ConfigDict({**base, **fields}), V)
  tokens = jax.random.randint(jax.random.key(0), (3, 12), 0, V)
  params = nn.unbox(model.init(jax.random.key(1), tokens)['params'])
  return model, params, tokens


def test_scan_and_remat_compute_the_same_function():
  model, params, tokens = make()
  scanned, scanned_params, _ = make(scan_layers=True, remat='full')
  # Same weights, stacked along a leading layer axis for the scanned model.
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), params['block_0'], params['block_1'])
  moved = {k: v for k, v in params.items() if not k.startswith('block_')} | {'blocks': stacked}
  assert jax.tree.structure(moved) == jax.tree.structure(scanned_params)
  np.testing.assert_allclose(
    scanned.apply({'params': moved}, tokens), model.apply({'params': params}, tokens), atol=1e-5
  )


def test_sinusoidal_is_the_papers_formula():
  d, pos = 8, np.arange(5)
  pe = np.asarray(layers.sinusoidal(jnp.asarray(pos), d))
  for i in range(d // 2):
    np.testing.assert_allclose(pe[:, 2 * i], np.sin(pos / 10000 ** (2 * i / d)), atol=1e-6)
    np.testing.assert_allclose(pe[:, 2 * i + 1], np.cos(pos / 10000 ** (2 * i / d)), atol=1e-6)


@pytest.mark.parametrize(
  'fields, message',
  [
    (dict(num_heads=3), 'num_heads=3 does not divide model.d_model=16'),
    (dict(pos_encoding='alibi'), "pos_encoding='alibi'; allowed: learned, sinusoidal, rotary"),
    (dict(d_model=0), 'model.d_model must be positive, got 0'),
    (dict(remat='some'), "model.remat='some'"),
    (dict(depth=3), "model 'transformer' has no field"),
    (dict(name='mamba'), f"unknown model.name='mamba'; available: {', '.join(models.available())}"),
  ],
)
def test_bad_model_configs_are_named(fields, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(').replace('[', r'\[')):
    make(**fields)


def test_sequence_longer_than_context_is_refused():
  model, params, _ = make(max_len=12)
  with pytest.raises(ConfigError, match='sequence length 16 exceeds model.max_len=12'):
    model.apply({'params': params}, jnp.zeros((1, 16), jnp.int32))


def test_bfloat16_compute_stays_close_to_float32():
  model, params, tokens = make()
  bf16, _, _ = make(dtype='bfloat16')
  full = model.apply({'params': params}, tokens)
  half = bf16.apply({'params': params}, tokens)
  assert half.dtype == jnp.float32  # logits, softmax and loss stay float32
  np.testing.assert_allclose(half, full, atol=0.05)
  assert not np.allclose(half, full, atol=1e-6)  # the compute really ran in bfloat16
