import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ar_jax import decoding, models
from ar_jax.errors import ConfigError

V = 11


@pytest.fixture(scope='module')
def model_and_params():
  cfg = ml_collections.ConfigDict(
    dict(name='transformer', num_layers=2, num_heads=2, d_model=16, max_len=20)
  )
  model = models.get_model(cfg, V)
  params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))['params'])
  # Sharpen the output so greedy paths are not decided by float noise.
  params['head']['kernel'] = params['head']['kernel'] * 30
  return model, params


def test_cached_greedy_equals_argmax_of_full_forward(model_and_params):
  model, params = model_and_params
  prompts = jnp.array([[1, 2, 3], [4, 5, 6]])
  out = decoding.generate(model, params, prompts, 8, jax.random.key(0), temperature=0.0)
  # No cache: the whole prefix every step. Zero padding after it changes nothing (causal),
  # and keeps one compiled shape.
  forward = jax.jit(lambda t: model.apply({'params': params}, t))
  tokens = jnp.zeros((2, 11), jnp.int32).at[:, :3].set(prompts)
  for t in range(3, 11):
    tokens = tokens.at[:, t].set(jnp.argmax(forward(tokens)[:, t - 1], -1))
  np.testing.assert_array_equal(out, tokens)


def test_top_k_one_is_greedy(model_and_params):
  model, params = model_and_params
  prompts = jnp.array([[7, 1]])
  greedy = decoding.generate(model, params, prompts, 6, jax.random.key(0), temperature=0.0)
  top1 = decoding.generate(model, params, prompts, 6, jax.random.key(3), top_k=1)
  np.testing.assert_array_equal(greedy, top1)


def test_sampling_depends_on_the_key_only(model_and_params):
  model, params = model_and_params
  prompts = jnp.array([[7, 1]] * 4)
  a = decoding.generate(model, params, prompts, 12, jax.random.key(1), temperature=2.0)
  b = decoding.generate(model, params, prompts, 12, jax.random.key(1), temperature=2.0)
  c = decoding.generate(model, params, prompts, 12, jax.random.key(2), temperature=2.0)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize('p, kept', [(0.5, 1), (0.7, 2), (0.8, 2), (0.81, 3), (1.0, 4)])
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  filtered = decoding.filter_logits(logits, 1.0, 0, p)
  order = [1, 3, 2, 0]  # tokens by probability
  assert np.isfinite(np.asarray(filtered[0, order[:kept]])).all()
  assert np.isneginf(np.asarray(filtered[0, order[kept:]])).all()


def test_temperature_scales_before_top_k():
  logits = jnp.array([[1.0, 3.0, 2.0]])
  filtered = decoding.filter_logits(logits, 0.5, 2, 1.0)
  np.testing.assert_allclose(filtered, [[-np.inf, 6.0, 4.0]])


def test_more_tokens_than_the_context_is_refused(model_and_params):
  model, params = model_and_params
  with pytest.raises(ConfigError, match="= 21 exceeds the model's context of 20 positions"):
    decoding.generate(model, params, jnp.zeros((1, 5), jnp.int32), 16, jax.random.key(0))
