"""The recurrences linear in the state (minGRU, minLSTM, Hawk's RG-LRU, Mamba's selective
SSM): their parallel scans against the same recurrence run one step at a time, each model's
recurrence against its paper's equations in float64 NumPy, and the chunked scan's memory.
The models' contract (causality, cached decoding, packing, sharding) is tests/test_contract.py's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ar_jax.models import recurrence
from ar_jax.models.families import hawk, mamba, minrnn

LENGTHS = (1, 2, 3, 17, 128)


def chunked_scan(chunk):
  def run_chunk(h0, ab):
    h = recurrence.affine_scan(*ab, h0)
    return h[:, -1], h

  # The carried state is float32, as the models keep it.
  return lambda a, b, h0: recurrence.chunked(run_chunk, (a, b), h0.astype(jnp.float32), chunk)[1]


def log_space_reference(log_a, log_b, h0):
  return recurrence.sequential_scan(jnp.exp(log_a), jnp.exp(log_b), h0)


# name -> (scan, the sequential scan of the same inputs, whether b may be negative). The
# log-space scan takes (log a, log b, h0). The chunk size 4 divides 128, 5 divides none
# of LENGTHS, and lengths up to the chunk run as one piece.
SCANS = {
  'affine': (recurrence.affine_scan, recurrence.sequential_scan, True),
  'log_space': (minrnn.linear_scan, log_space_reference, False),
  **{f'chunk{c}': (chunked_scan(c), recurrence.sequential_scan, True) for c in (4, 5)},
}


def coefficients(length, signed, seed=0):
  """(a, b, h0) for a [2, length, 3, 2] state, a document start (a = 0) halfway."""
  ka, kb, kh = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.uniform(ka, (2, length, 3, 2), minval=0.5, maxval=1.0)
  a = a.at[:, length // 2].set(0.0) if length > 2 else a
  b = jax.random.normal(kb, a.shape) if signed else jax.random.uniform(kb, a.shape, minval=0.1)
  return a, b, jax.random.uniform(kh, (2, 3, 2))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
@pytest.mark.parametrize('name', SCANS)
def test_the_parallel_scan_is_the_sequential_scan(name, dtype):
  """Values and gradients, at every length. Given bfloat16 inputs the scan still runs in
  float32: its values are the float32 sequential scan's of the rounded inputs."""
  scan, reference, signed = SCANS[name]

  def value_and_grad(scan):
    return jax.jit(jax.value_and_grad(lambda abh, w: (scan(*abh) * w).sum()))

  ours, expected_grad = value_and_grad(scan), value_and_grad(reference)
  for length in LENGTHS:
    a, b, h0 = coefficients(length, signed)
    abh = (jnp.log(a), jnp.log(b), h0) if name == 'log_space' else (a, b, h0)
    abh = jax.tree.map(lambda x: x.astype(dtype), abh)
    weights = jax.random.normal(jax.random.key(length), a.shape)
    abh_f32 = jax.tree.map(lambda x: x.astype(jnp.float32), abh)
    h = scan(*abh)
    assert h.dtype == jnp.float32
    np.testing.assert_allclose(
      h,
      reference(*abh_f32),
      rtol=1e-5,
      atol=1e-6,
      err_msg=f'length {length}',
    )
    # The gradients of the float32 scan, rounded to bfloat16 at the end (one rounding).
    (_, grads), (_, expected) = ours(abh, weights), expected_grad(abh_f32, weights)
    tolerance = 1e-5 if dtype == 'float32' else 2**-7
    for g, e, what in zip(grads, expected, ('a', 'b', 'h0'), strict=True):
      assert g.dtype == jnp.dtype(dtype)
      np.testing.assert_allclose(
        np.float32(g),
        np.float32(e),
        rtol=tolerance,
        atol=tolerance,
        err_msg=f'd{what}, length {length}',
      )


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def _g(x):  # minGRU/minLSTM's candidate activation: positive, so the state has a logarithm
  return np.where(x >= 0, x + 0.5, _sigmoid(x))


@pytest.mark.parametrize('cell', ['mingru', 'minlstm'])
def test_min_rnns_follow_the_papers_equations(cell):
  """Feng et al. 2024, eqs. for minGRU and minLSTM (with normalised gates), in float64 on
  random weights, against the log-space scan."""
  rng = np.random.default_rng(0)
  x_BTD = rng.normal(size=(2, 19, 4))
  w_DGE = rng.normal(size=(4, minrnn.CELLS[cell], 5))
  k_BTGE = np.einsum('btd,dge->btge', x_BTD, w_DGE)
  h, expected = np.zeros((2, 5)), []
  for k_BGE in k_BTGE.transpose(1, 0, 2, 3):
    if cell == 'mingru':
      z, h_tilde = _sigmoid(k_BGE[:, 0]), _g(k_BGE[:, 1])
      h = (1 - z) * h + z * h_tilde
    else:
      f, i, h_tilde = _sigmoid(k_BGE[:, 0]), _sigmoid(k_BGE[:, 1]), _g(k_BGE[:, 2])
      h = f / (f + i) * h + i / (f + i) * h_tilde
    expected.append(h)
  log_a, log_b = minrnn.log_coefficients(cell, jnp.asarray(k_BTGE, jnp.float32))
  ours = minrnn.linear_scan(log_a, log_b, jnp.zeros((2, 5)))
  np.testing.assert_allclose(ours, np.stack(expected, axis=1), rtol=1e-5, atol=1e-6)


def test_the_rg_lru_follows_the_papers_equations():
  """De et al. 2024, eqs. 1-4, in float64: r_t and i_t sigmoid gates, a_t = s(L)^(c r_t),
  h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t); and s(L)^c starts in [0.9, 0.999]."""
  rng = np.random.default_rng(1)
  x, gate_a, gate_x = rng.normal(size=(3, 2, 17, 6))
  a_param = np.asarray(hawk._a_param_init(jax.random.key(0), (6,)), float)
  assert ((_sigmoid(a_param) ** hawk.C > 0.9 - 1e-6) & (_sigmoid(a_param) ** hawk.C < 0.999)).all()
  h, expected = rng.normal(size=(2, 6)), []
  h0 = h
  for t in range(17):
    a = _sigmoid(a_param) ** (hawk.C * _sigmoid(gate_a[:, t]))
    h = a * h + np.sqrt(1 - a**2) * (_sigmoid(gate_x[:, t]) * x[:, t])
    expected.append(h)
  args = [jnp.asarray(v, jnp.float32) for v in (x, gate_a, gate_x, a_param)]
  ours = recurrence.affine_scan(*hawk.rg_lru_coefficients(*args), jnp.asarray(h0, jnp.float32))
  np.testing.assert_allclose(ours, np.stack(expected, axis=1), rtol=1e-5, atol=1e-6)


def test_the_zero_order_hold_is_the_matrix_exponential():
  """For dh/dt = A h + B u over Delta: [[Abar, Bbar], [0, 1]] = expm(Delta [[A, B], [0, 0]]),
  the exact discretisation (Van Loan 1978), here with scipy's expm on the full matrix."""
  rng = np.random.default_rng(2)
  delta_BTE = np.exp(rng.uniform(np.log(1e-3), np.log(2.0), size=(1, 3, 2)))
  a_EN = -np.exp(rng.normal(size=(2, 4)))
  b_BTN = rng.normal(size=(1, 3, 4))
  abar, bbar = mamba.discretise(*(jnp.asarray(v, jnp.float32) for v in (delta_BTE, a_EN, b_BTN)))
  for t in range(3):
    for e in range(2):
      m = np.zeros((5, 5))
      m[:4, :4], m[:4, 4] = np.diag(a_EN[e]), b_BTN[0, t]
      exact = scipy.linalg.expm(delta_BTE[0, t, e] * m)
      np.testing.assert_allclose(abar[0, t, e], np.diag(exact[:4, :4]), rtol=1e-6)
      np.testing.assert_allclose(bbar[0, t, e], exact[:4, 4], rtol=1e-5, atol=1e-7)


def test_the_selective_scan_follows_the_equations():
  """h_t = Abar_t h_{t-1} + Bbar_t u_t, y_t = C_t . h_t, one step at a time in float64, against
  the chunked scan (chunks of 5 over 17 positions), with a document start at t = 9."""
  rng = np.random.default_rng(3)
  B, T, E, N = 2, 17, 3, 4
  u, delta = rng.normal(size=(B, T, E)), np.exp(rng.normal(size=(B, T, E)) - 2)
  a_EN = -np.exp(rng.normal(size=(E, N)))
  b_BTN, c_BTN = rng.normal(size=(2, B, T, N))
  keep = np.arange(T) != 9
  h, ys = rng.normal(size=(B, E, N)), []
  h0 = h
  for t in range(T):
    abar = np.exp(delta[:, t, :, None] * a_EN)
    bbar = (abar - 1) / a_EN * b_BTN[:, t, None]
    h = abar * h * keep[t] + bbar * u[:, t, :, None]
    ys.append(np.einsum('ben,bn->be', h, c_BTN[:, t]))
  args = [jnp.asarray(v, jnp.float32) for v in (u, delta, a_EN, b_BTN, c_BTN)]
  keep_BT = jnp.broadcast_to(jnp.asarray(keep), (B, T))
  y, h_last = mamba.selective_scan(*args, keep_BT, jnp.asarray(h0, jnp.float32), chunk=5)
  np.testing.assert_allclose(y, np.stack(ys, axis=1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(h_last, h, rtol=1e-5, atol=1e-6)


def test_the_chunked_scan_keeps_one_chunk_of_states():
  """A Mamba layer's compiled train step at 4,096 positions needs no more than twice its
  memory per position at 1,024, and with chunks of 256 under a quarter of what one scan
  over all 4,096 positions needs (its [T, E, N] states, several times over)."""
  from ar_jax import models  # noqa: PLC0415

  def temp_bytes(length, chunk):
    config = models.tiny_configs('mamba')['mamba']
    config.update(num_layers=1, d_state=16, chunk=chunk)
    model = models.get_model(config, 13)
    tokens = jnp.zeros((1, length), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), tokens)
    loss = jax.grad(lambda p: model.apply(p, tokens).sum())
    return jax.jit(loss).lower(params).compile().memory_analysis().temp_size_in_bytes

  short, long, whole = temp_bytes(1024, 256), temp_bytes(4096, 256), temp_bytes(4096, 4096)
  assert long / 4096 <= 2 * short / 1024, (short, long)
  assert long < whole / 4, (long, whole)


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
