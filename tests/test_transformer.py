import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ar_jax import models
from ar_jax.errors import ConfigError
from ar_jax.models import layers, numerics

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
    (dict(name='hyena'), f"unknown model.name='hyena'; available: {', '.join(models.available())}"),
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


@pytest.mark.parametrize('cached', [False, True])
def test_fused_attention_equals_the_written_out_one(cached):
  """jax.nn.dot_product_attention (XLA's implementation here) against the attention written
  out: values and gradients, over the whole window and over a KV cache's slots."""
  B, T, S, H, K = 2, 6, 10 if cached else 6, 3, 8
  q, k, v = (jax.random.normal(jax.random.key(i), (B, n, H, K)) for i, n in enumerate((T, S, S)))
  if cached:  # T new tokens at positions 2 .. 7 of a 10-slot cache
    mask = (jnp.arange(S)[None, :] <= (2 + jnp.arange(T))[:, None])[None]
  else:  # two packed documents per row: causal within each
    segments = jnp.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    mask = jnp.tril(jnp.ones((T, T), bool)) & (segments[:, :, None] == segments[:, None, :])
  fused = lambda q, k, v: layers.attend(q, k, v, mask, 'xla')
  written = lambda q, k, v: layers.attend_written_out(q, k, v, mask, lambda p: p, numerics.FLOAT32)
  np.testing.assert_allclose(fused(q, k, v), written(q, k, v), atol=1e-6)
  grads = [
    jax.grad(lambda *a, f=f: (f(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)
    for f in (fused, written)
  ]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), *grads)
  causal = layers.attend(q[:, :6], k[:, :6], v[:, :6], None, 'xla', is_causal=True)
  tril = jnp.tril(jnp.ones((1, 6, 6), bool))
  np.testing.assert_allclose(
    causal,
    layers.attend_written_out(q[:, :6], k[:, :6], v[:, :6], tril, lambda p: p, numerics.FLOAT32),
    atol=1e-6,
  )


def test_auto_attention_is_written_out_on_the_cpu_path_only():
  cpu, accelerator = (numerics.policy('bfloat16', path) for path in ('cpu', 'accelerator'))
  assert layers.attention_implementation('auto', cpu) == 'einsum'
  # cuDNN's kernel only on a GPU: this is a CPU, where the accelerators' path takes XLA's.
  assert layers.attention_implementation('auto', accelerator) == 'xla'
  assert numerics.policy('bfloat16').cpu  # 'auto' on this CPU
  with pytest.raises(ConfigError, match="attention='flash'; allowed: auto, einsum, xla, cudnn"):
    layers.attention_implementation('flash', numerics.FLOAT32)


@pytest.mark.parametrize('path', ['cpu', 'accelerator'])
@pytest.mark.parametrize('transpose_b', [False, True])
@pytest.mark.parametrize('batch', [(), (2, 3)])
def test_half_matmul_takes_its_gradient_products_in_bfloat16(batch, transpose_b, path):
  """A bf16 matmul returning float32 (the CPU path's activations; attention's scores on
  either path) takes its gradient as the two products of the bf16-rounded cotangent with the
  bf16 operands, accumulated in float32 and returned in the operands' own dtype (float32
  here, as parameters are)."""
  M, K, N = 5, 7, 6
  a = jax.random.normal(jax.random.key(0), (*batch, M, K))
  b = jax.random.normal(jax.random.key(1), (*batch, N, K) if transpose_b else (*batch, K, N))
  g = jax.random.normal(jax.random.key(2), (*batch, M, N))
  p = numerics.policy('bfloat16', path)
  matmul = lambda a, b: numerics.matmul(a, b, p, transpose_b, out_dtype=jnp.float32)
  out, vjp = jax.vjp(matmul, a, b)
  da, db = vjp(g)
  half = lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  bt = np.swapaxes(half(b), -1, -2) if transpose_b else half(b)
  np.testing.assert_allclose(out, half(a) @ bt, rtol=1e-5, atol=1e-5)
  assert out.dtype == da.dtype == db.dtype == jnp.float32
  np.testing.assert_allclose(da, half(g) @ np.swapaxes(bt, -1, -2), rtol=1e-5, atol=1e-5)
  db_expected = np.swapaxes(half(a), -1, -2) @ half(g)
  if transpose_b:
    db_expected = np.swapaxes(db_expected, -1, -2)
  np.testing.assert_allclose(db, db_expected, rtol=1e-5, atol=1e-5)
  # A NaN cotangent leaves the gradient non-finite (on the CPU path, the materialised
  # transpose's branch).
  assert not np.isfinite(vjp(g.at[(0,) * g.ndim].set(jnp.nan))[1]).all()


def _dot_operand_dtypes(hlo: str) -> list[tuple[str, str]]:
  """The element types of every dot's two operands in an optimised HLO module's text."""
  types = dict(re.findall(r'%([\w.-]+) = (\w+)\[', hlo))
  return [
    (types[lhs], types[rhs]) for lhs, rhs in re.findall(r' dot\(%([\w.-]+), %([\w.-]+)\)', hlo)
  ]


@pytest.mark.parametrize('name', ['transformer', 'conv'])
def test_bfloat16_training_runs_every_product_in_bfloat16_on_a_cpu(name):
  """XLA:CPU upcasts a bf16 product it cannot give its bf16 kernels (a transposed left
  operand, a float32 cotangent) to float32: none may be left in a bf16 train step, forward
  or backward, attention included."""
  sizes = {
    'transformer': dict(num_layers=2, num_heads=2, d_model=16, max_len=24, tie_embeddings=True),
    'conv': dict(channels=16, layers_per_block=2, skip_channels=16, head_channels=16),
  }
  fields = dict(name=name, dtype='bfloat16', **sizes[name])
  model = models.get_model(ml_collections.ConfigDict(fields), V)
  tokens = jax.random.randint(jax.random.key(0), (3, 12), 0, V)
  params = nn.unbox(model.init(jax.random.key(1), tokens)['params'])
  loss = lambda p: (model.apply({'params': p}, tokens) ** 2).sum()  # a cotangent XLA cannot fold
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  dtypes = _dot_operand_dtypes(hlo)
  assert len(dtypes) >= 3 * (2 if name == 'conv' else 6)  # forward and two gradient products
  assert set(dtypes) == {('bf16', 'bf16')}, dtypes
