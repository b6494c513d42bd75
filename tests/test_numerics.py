"""The two numerics paths (ar_jax/models/numerics.py) on this CPU: the accelerators' path,
which GPUs and TPUs take by default, computed here too, for the transformer and a linear
recurrence: the same numbers as the CPU path in float32, activations really in bfloat16 in
half precision, and the contract's invariants and a sharded train step on it."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ar_jax import models
from tests.helpers import family_config, one_step, position_jacobian, random_params, write_corpus

V, T = 13, 12
FAMILIES = ['transformer', 'hawk']


def model(family: str, **fields):
  tiny = next(iter(models.tiny_configs(family).values()))
  return models.get_model(ml_collections.ConfigDict({**tiny, **fields}), V)


@pytest.mark.parametrize('family', FAMILIES)
def test_in_float32_the_paths_compute_the_same_numbers(family):
  cpu, accelerator = (model(family, numerics=path) for path in ('cpu', 'accelerator'))
  params = random_params(cpu)
  tokens = jax.random.randint(jax.random.key(0), (2, T), 0, V)
  np.testing.assert_allclose(
    accelerator.apply({'params': params}, tokens),
    cpu.apply({'params': params}, tokens),
    atol=1e-5,
    rtol=1e-5,
  )


@pytest.mark.parametrize('family', FAMILIES)
def test_in_bfloat16_the_accelerator_path_keeps_activations_in_bfloat16(family):
  """Its residual stream is bf16 (the CPU path's float32), its logits float32 and near the
  float32 model's; causality holds, and cached decoding gives the full forward's logits to
  bf16's precision."""
  paths = {p: model(family, numerics=p, dtype='bfloat16') for p in ('cpu', 'accelerator')}
  exact = model(family)
  params = random_params(exact)
  tokens = jax.random.randint(jax.random.key(0), (2, T), 0, V)
  stream = lambda m: str(jax.make_jaxpr(lambda p: m.apply({'params': p}, tokens))(params))
  D = exact.config.d_model
  assert f'bf16[2,{T},{D}]' in stream(paths['accelerator'])
  assert f'bf16[2,{T},{D}]' not in stream(paths['cpu'])

  accelerator = paths['accelerator']
  logits = accelerator.apply({'params': params}, tokens)
  assert logits.dtype == jnp.float32
  reference = exact.apply({'params': params}, tokens)
  np.testing.assert_allclose(logits, reference, atol=0.15, rtol=0.05)
  assert not np.allclose(logits, paths['cpu'].apply({'params': params}, tokens), atol=1e-6)

  seen_TT = position_jacobian(accelerator, params, tokens[:1]) > 0
  t, s = np.indices(seen_TT.shape)
  assert not seen_TT[s > t].any() and seen_TT[1:].any(axis=1).all()
  cache = accelerator.init_cache(2, T)
  step = lambda t, c: accelerator.apply({'params': params}, t, c, method=accelerator.step)
  first, cache = step(tokens[:, :5], cache)
  rest, _ = step(tokens[:, 5:], cache)
  np.testing.assert_allclose(jnp.concatenate([first, rest], 1), logits, atol=0.1, rtol=0.05)


@pytest.mark.parametrize('family', FAMILIES)
def test_a_sharded_bfloat16_step_on_the_accelerator_path_tracks_float32(family, tmp_path):
  corpus = write_corpus(tmp_path / 'corpus.txt')
  mesh = {'mesh.data': 2, 'mesh.fsdp': 2, 'mesh.tensor': 2}
  base, base_loss, initial = one_step(family_config(corpus, family), tmp_path / 'f32')
  half = {'model.dtype': 'bfloat16', 'model.numerics': 'accelerator'}
  state, loss, _ = one_step(
    family_config(corpus, family, **mesh, **half), tmp_path / 'bf16', initial
  )
  assert loss == pytest.approx(base_loss, rel=0.02)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(base.params), strict=True):
    assert a.dtype == jnp.float32  # parameters stay float32
    np.testing.assert_allclose(a, b, atol=0.02)
