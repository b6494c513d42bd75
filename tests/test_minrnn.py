"""minGRU and minLSTM: the log-space parallel scan is the recurrence it replaces, at lengths
where a product of gates underflows, and across a document start."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ar_jax.models import minrnn


@pytest.mark.parametrize('cell', ['mingru', 'minlstm'])
def test_the_parallel_scan_is_the_sequential_recurrence(cell):
  B, T, E = 2, 4096, 8
  gates = 3 * jax.random.normal(jax.random.key(0), (B, T, minrnn.CELLS[cell], E))
  keep = np.ones((B, T), bool)
  keep[1, 3000] = False  # a document starts: h_2999 is forgotten
  h0 = jnp.full((B, E), 0.7)
  log_a, log_b = minrnn.log_coefficients(cell, gates)
  log_a = jnp.where(keep[..., None], log_a, -jnp.inf)
  scanned = np.asarray(jax.jit(minrnn.linear_scan)(log_a, log_b, h0))

  a, b = np.exp(np.asarray(log_a, np.float64)), np.exp(np.asarray(log_b, np.float64))
  h, expected = np.full((B, E), 0.7), np.empty((B, T, E))
  for t in range(T):
    h = a[:, t] * h + b[:, t]
    expected[:, t] = h
  assert np.isfinite(scanned).all()
  np.testing.assert_allclose(scanned, expected, rtol=2e-4, atol=1e-6)
  # Far from the start, the product of 4,096 gates is below float32's range: h0 is gone.
  assert np.prod(a[0], axis=0).max() < 1e-38


def test_nothing_after_a_document_start_depends_on_what_came_before_it():
  gates = jax.random.normal(jax.random.key(1), (1, 16, 2, 4))
  keep = (jnp.arange(16) != 8)[None, :, None]

  def after_the_start(g):
    log_a, log_b = minrnn.log_coefficients('mingru', g)
    h = minrnn.linear_scan(jnp.where(keep, log_a, -jnp.inf), log_b, jnp.ones((1, 4)))
    return h[:, 8:].sum()

  grad = np.asarray(jax.grad(after_the_start)(gates))
  assert np.isfinite(grad).all()
  assert (grad[0, :8] == 0).all() and (grad[0, 8:] != 0).any()


def test_the_written_gradient_equals_autodiff_through_the_scan():
  gates = jax.random.normal(jax.random.key(0), (2, 33, 3, 5))
  keep = (jnp.arange(33) != 20)[None, :, None]
  h0 = jax.random.uniform(jax.random.key(1), (2, 5))
  weights = jax.random.normal(jax.random.key(2), (2, 33, 5))

  def autodiff_scan(log_a, log_b, h0):
    log_decay, log_h = jax.lax.associative_scan(minrnn._compose, (log_a, log_b), axis=1)
    return jnp.exp(log_decay) * h0[:, None] + jnp.exp(log_h)

  def loss(scan, gates, h0):
    log_a, log_b = minrnn.log_coefficients('minlstm', gates)
    return (scan(jnp.where(keep, log_a, -jnp.inf), log_b, h0) * weights).sum()

  grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)  # op by op takes 10 s
  ours, autodiff = grad(minrnn.linear_scan, gates, h0), grad(autodiff_scan, gates, h0)
  for a, b in zip(ours, autodiff, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
