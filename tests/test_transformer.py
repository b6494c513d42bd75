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


@pytest.mark.parametrize('pos_encoding', ['learned', 'sinusoidal', 'rotary'])
def test_causal_by_gradients(pos_encoding):
  """d logits[t] / d embeddings[s] is exactly zero for s > t, and non-zero for s <= t."""
  model, params, tokens = make(pos_encoding=pos_encoding)
  variables = model.init(jax.random.key(1), tokens)
  T = tokens.shape[1]

  def logits_at(perturbation, select_T):
    out_BTV = model.apply({'params': params, 'perturbations': perturbation}, tokens)
    return jnp.einsum('btv,t->', out_BTV, select_T)

  # One compiled gradient per position t: grads[t, b, s, d] = d sum(logits[:, t]) / d x[b, s, d].
  grads = jax.jit(jax.vmap(jax.grad(logits_at), in_axes=(None, 0)))(
    variables['perturbations'], jnp.eye(T)
  )['embeddings']
  per_position_TS = np.abs(np.asarray(grads)).sum(axis=(1, 3))
  for t in range(T):
    assert np.all(per_position_TS[t, t + 1 :] == 0.0), (t, per_position_TS[t])
    assert np.all(per_position_TS[t, : t + 1] > 0.0), (t, per_position_TS[t])


@pytest.mark.parametrize('scan_layers', [False, True])
@pytest.mark.parametrize('pos_encoding', ['learned', 'sinusoidal', 'rotary'])
def test_cached_decoding_equals_full_forward(pos_encoding, scan_layers):
  model, params, tokens = make(pos_encoding=pos_encoding, scan_layers=scan_layers)
  full = model.apply({'params': params}, tokens)
  cache = model.init_cache(tokens.shape[0], 24)
  step = jax.jit(lambda t, c: model.apply({'params': params}, t, c, method=model.step))
  pieces = []
  logits, cache = step(tokens[:, :5], cache)  # a prefill, then one token at a time
  pieces.append(logits)
  for t in range(5, tokens.shape[1]):
    logits, cache = step(tokens[:, t : t + 1], cache)
    pieces.append(logits)
  np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, atol=2e-5, rtol=1e-5)
  assert int(cache['index']) == tokens.shape[1]


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


def test_sinusoidal_is_the_seed_formula():
  d, pos = 8, np.arange(5)
  pe = np.asarray(layers.sinusoidal(jnp.asarray(pos), d))
  for i in range(d // 2):
    np.testing.assert_allclose(pe[:, 2 * i], np.sin(pos / 10000 ** (2 * i / d)), atol=1e-6)
    np.testing.assert_allclose(pe[:, 2 * i + 1], np.cos(pos / 10000 ** (2 * i / d)), atol=1e-6)


def test_flops_per_token_matches_xla_count():
  model, params, tokens = make(d_model=32, max_len=64)
  tokens = jnp.zeros((4, 64), jnp.int32)
  cost = jax.jit(lambda p, t: model.apply({'params': p}, t)).lower(params, tokens).compile()
  xla_flops = cost.cost_analysis()['flops']
  ours = model.flops_per_token(64) * tokens.size
  # XLA also counts the elementwise work (norms, GELU, softmax) that the matmul count leaves out.
  assert ours <= xla_flops <= 1.3 * ours, (ours, xla_flops)


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
