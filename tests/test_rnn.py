"""The recurrent family against equations written out by hand (a worked Elman step, BPTT in
float64, the LSTM's gates), and its contract."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ar_jax import models, train
from ar_jax import run as run_lib
from ar_jax import state as state_lib
from ar_jax.errors import ConfigError
from ar_jax.models import bptt, cells
from ar_jax.models.families import rnn
from tests.helpers import family_config, read_jsonl, tiny_config


def make(vocab=11, eos_id=None, **fields):
  base = dict(name='rnn', cell='lstm', num_layers=2, d_embed=8, d_hidden=16)
  model = models.get_model(ml_collections.ConfigDict({**base, **fields}), vocab, eos_id)
  params = nn.unbox(model.init(jax.random.key(1), jnp.zeros((2, 3), jnp.int32))['params'])
  return model, params


# A worked example, computed by hand: one Elman step on "I love deep learning" (vocabulary
# {I, love, deep, learning}) with these embeddings and weights, tanh state (the numbers are the
# hand computation's, rounded as it rounded them).
EMBED = np.array([[0.1, 0.3, 0.5], [0.7, 0.8, 0.2], [0.9, 0.4, 0.6], [0.5, 0.6, 0.7]])
W_X = np.array([[0.2, 0.1, 0.4], [0.3, 0.5, 0.7], [0.6, 0.2, 0.8]])
B_H = np.array([0.1, 0.2, 0.3])
W_Y = np.array([[0.2, 0.6, 0.1], [0.3, 0.7, 0.5], [0.4, 0.2, 0.8]])  # rows: love, deep, learning


def worked_model(b_y):
  """The worked example's Elman RNN in the real model code; kernels are stored transposed
  ([in, out])."""
  model, params = make(vocab=4, cell='elman', num_layers=1, d_embed=3, d_hidden=3)
  layer = params['block_0']['layer']
  params['embed']['embedding'] = jnp.asarray(EMBED, jnp.float32)
  layer['input_kernel'] = jnp.asarray(W_X.T, jnp.float32)
  layer['bias'] = jnp.asarray(B_H, jnp.float32)
  layer['recurrent_kernel'] = jnp.asarray(np.random.default_rng(0).normal(size=(3, 3)))
  # The output vocabulary is {love, deep, learning}; "I" (row 0) is never predicted.
  params['head']['kernel'] = jnp.asarray(np.concatenate([np.zeros((3, 1)), W_Y.T], 1))
  params['head']['bias'] = jnp.asarray(np.concatenate([[-1e9], b_y]), jnp.float32)
  return model, params


def test_worked_example_of_an_elman_step():
  model, params = worked_model(b_y=np.zeros(3))
  word_I = jnp.array([[0]])
  _, cache = model.apply({'params': params}, word_I, model.init_cache(1), method=model.step)
  h1 = np.asarray(cache[0][0][0])  # h_0 = 0, so W_h plays no part
  np.testing.assert_allclose(np.arctanh(h1) - B_H, [0.25, 0.53, 0.52], atol=1e-6)  # W_x x_1
  np.testing.assert_allclose(h1, np.tanh([0.35, 0.73, 0.82]), atol=1e-6)
  np.testing.assert_allclose(h1, [0.336, 0.623, 0.675], atol=5e-4)  # the hand computation's h_1
  # W_y h for the hand computation's rounded h = [0.48, 0.62, 0.67].
  h = jnp.array([[0.48, 0.62, 0.67]])
  logits = model.apply({'params': params}, h, method=model.readout)[0, 1:]
  np.testing.assert_allclose(logits, [0.535, 0.913, 0.852], atol=1e-6)
  # With b_y chosen so that the model's logits are the hand computation's (love 0.87, deep 0.81,
  # learning 0.492): P = softmax = [0.381, 0.358, 0.261], and "love" is the most likely.
  model, params = worked_model(b_y=np.array([0.87, 0.81, 0.492]) - W_Y @ h1)
  logits = model.apply({'params': params}, word_I)[0, 0]
  probs = np.asarray(jax.nn.softmax(logits))[1:]
  np.testing.assert_allclose(probs, [0.381, 0.358, 0.261], atol=5e-4)
  assert int(np.argmax(logits)) == 1  # love


def numpy_bptt(params, tokens):
  """BPTT written out in float64 for a one-layer Elman RNN and one sequence: e_t = p_t -
  onehot(x_{t+1}), r_t = f'(a_t) * (W_y^T e_t + W_h^T r_{t+1}), dW_h = sum_t r_t h_{t-1}^T."""
  E = np.asarray(params['embed']['embedding'], np.float64)
  W_xh = np.asarray(params['block_0']['layer']['input_kernel'], np.float64).T
  W_hh = np.asarray(params['block_0']['layer']['recurrent_kernel'], np.float64).T
  b_h = np.asarray(params['block_0']['layer']['bias'], np.float64)
  W_ho = np.asarray(params['head']['kernel'], np.float64).T
  b_o = np.asarray(params['head']['bias'], np.float64)
  T = len(tokens) - 1
  xs = E[tokens[:-1]]
  hs, ps = [np.zeros(W_hh.shape[0])], []
  for t in range(T):
    hs.append(np.tanh(W_xh @ xs[t] + W_hh @ hs[-1] + b_h))
    z = W_ho @ hs[-1] + b_o
    ps.append(np.exp(z - z.max()) / np.exp(z - z.max()).sum())
  ys = np.eye(len(b_o))[tokens[1:]]
  g = {k: 0.0 for k in ('W_xh', 'W_hh', 'b_h', 'W_ho', 'b_o')}
  g['E'] = np.zeros_like(E)
  s_next, J_next = np.zeros_like(b_h), np.zeros_like(W_hh)
  for t in reversed(range(T)):
    h, h_prev = hs[t + 1], hs[t]
    delta = W_ho.T @ (ps[t] - ys[t])  # (ii) delta_t = W_ho^T (p_t - y_{t+1})
    s = delta + J_next.T @ s_next  # (iv) s_t = delta_t + J_{t+1}^T s_{t+1}
    r = (1.0 - h**2) * s  # (v) r_t = f'(a_t) * s_t
    g['W_ho'] += np.outer(ps[t] - ys[t], h)  # (vi)
    g['b_o'] += ps[t] - ys[t]
    g['W_xh'] += np.outer(r, xs[t])  # (vii)
    g['W_hh'] += np.outer(r, h_prev)
    g['b_h'] += r
    g['E'][tokens[t]] += W_xh.T @ r  # the input x_t is an embedding row
    s_next, J_next = s, np.diag(1.0 - h**2) @ W_hh  # (iii) J_t = D_t W_hh
  return g


def test_hand_written_bptt_equals_jax_grad():
  model, params = make(vocab=7, cell='elman', num_layers=1, d_embed=5, d_hidden=6)

  def loss(p, tokens_1T):
    logits = model.apply({'params': p}, tokens_1T[:, :-1])
    return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens_1T[:, 1:, None], -1))

  grad = jax.jit(jax.grad(loss))
  rng = np.random.default_rng(0)
  for T in range(1, 21):
    tokens = rng.integers(0, 7, size=T + 1)
    ours = grad(params, jnp.asarray(tokens)[None])
    ref = numpy_bptt(params, tokens)
    pairs = {
      'W_xh': ours['block_0']['layer']['input_kernel'].T,
      'W_hh': ours['block_0']['layer']['recurrent_kernel'].T,
      'b_h': ours['block_0']['layer']['bias'],
      'W_ho': ours['head']['kernel'].T,
      'b_o': ours['head']['bias'],
      'E': ours['embed']['embedding'],
    }
    for name, value in pairs.items():
      np.testing.assert_allclose(value, ref[name], rtol=2e-4, atol=2e-6, err_msg=f'{name} T={T}')


def test_float64_parameters_compute_in_float64_under_x64():
  """With jax_enable_x64 and float64 parameters, the matmuls accumulate (and the state
  stays) in float64: the gradient equals float64 BPTT to rounding, not to float32's 1e-7.
  A decoding cache keeps its float32, so a sampling loop carries one type."""
  tokens = np.random.default_rng(0).integers(0, 7, size=13)
  with jax.enable_x64(True):
    model, params = make(vocab=7, cell='elman', num_layers=1, d_embed=5, d_hidden=6)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)

    def loss(p):
      logits = model.apply({'params': p}, jnp.asarray(tokens)[None, :-1])
      assert logits.dtype == jnp.float64
      return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[None, 1:, None], -1))

    grad = jax.grad(loss)(params)
    ref = numpy_bptt(params, tokens)
    np.testing.assert_allclose(
      grad['block_0']['layer']['recurrent_kernel'].T, ref['W_hh'], atol=1e-12
    )
    cache = model.init_cache(1)
    _, after = model.apply({'params': params}, jnp.asarray(tokens)[None], cache, method='step')
    assert jax.tree.map(lambda a: a.dtype, after) == jax.tree.map(lambda a: a.dtype, cache)


def test_a_compute_dtype_outside_the_supported_ones_is_named():
  with pytest.raises(ConfigError, match=r"model.dtype='float8'; allowed: float32, bfloat16"):
    make(dtype='float8')


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def reference_layer(cell, p, xs):
  """Float64, one step at a time, written from the equations (gate blocks as stored)."""
  W, U, b = (np.asarray(p[k], np.float64) for k in ('input_kernel', 'recurrent_kernel', 'bias'))
  S = U.shape[0]
  h, c, out = np.zeros((xs.shape[0], S)), np.zeros((xs.shape[0], S)), []
  for t in range(xs.shape[1]):
    x = xs[:, t]
    if cell == 'lstm':
      zi, zf, zg, zo = np.split(x @ W + b + h @ U, 4, axis=-1)
      c = sigmoid(zf) * c + sigmoid(zi) * np.tanh(zg)  # C_t = f C_{t-1} + i C~
      h = sigmoid(zo) * np.tanh(c)  # h_t = o tanh(C_t)
    else:  # GRU, reset gate after the recurrent matmul
      bu = np.asarray(p['recurrent_bias'], np.float64)
      xr, xz, xn = np.split(x @ W + b, 3, axis=-1)
      hr, hz, hn = np.split(h @ U + bu, 3, axis=-1)
      r, z = sigmoid(xr + hr), sigmoid(xz + hz)
      h = (1 - z) * np.tanh(xn + r * hn) + z * h
    out.append(h)
  return np.stack(out, 1)


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_gated_cells_match_a_float64_reference(cell):
  model, params = make(cell=cell, forget_bias=1.0)
  tokens = jax.random.randint(jax.random.key(3), (3, 9), 0, 11)
  xs = np.asarray(params['embed']['embedding'], np.float64)[np.asarray(tokens)]
  for i in range(2):
    xs = reference_layer(cell, params[f'block_{i}']['layer'], xs)
  head = params['head']
  expected = xs @ np.asarray(head['kernel'], np.float64) + np.asarray(head['bias'])
  np.testing.assert_allclose(model.apply({'params': params}, tokens), expected, atol=2e-5)
  if cell == 'lstm':  # forget-gate bias initialisation: the second gate block starts at 1
    bias = np.asarray(params['block_0']['layer']['bias']).reshape(4, -1)
    assert (bias[1] == 1.0).all() and (bias[[0, 2, 3]] == 0.0).all()


@pytest.mark.parametrize(
  'cell,activation', [('elman', 'tanh'), ('elman', 'relu'), ('lstm', 'tanh'), ('gru', 'tanh')]
)
def test_hand_written_bptt_equals_autodiff_of_the_loop(cell, activation):
  """The cells' backward (from saved gates) and the matmuls after the loop against JAX's own
  differentiation of the same forward scan, through document restarts and a nonzero carry."""
  cfg = rnn.Config(vocab_size=2, cell=cell, activation=activation)
  c = cells.make_cell(cfg.cell, cfg.activation)
  T, B, D, S = 9, 3, 5, 4
  keys = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda *shape: jax.random.normal(next(keys), shape)  # noqa: E731
  args = (
    normal(T, B, D),
    0.5 * normal(D, c.gates * S),
    normal(c.gates * S),
    0.5 * normal(S, c.gates * S),
    normal(c.gates * S) if c.recurrent_bias else None,
    tuple(normal(B, S) for _ in c.state_names),
  )
  keep_TB = jnp.asarray(np.random.default_rng(0).random((T, B)) > 0.2, jnp.float32)
  assert 0 < keep_TB.sum() < T * B
  weights_TBS, weights_final = normal(T, B, S), tuple(normal(B, S) for _ in c.state_names)

  def loss(run, *a):
    h_TBS, final = run(c, 1, jnp.dtype('float32'), *a, keep_TB)
    return jnp.sum(h_TBS * weights_TBS) + sum(
      jnp.sum(x * w) for x, w in zip(final, weights_final, strict=True)
    )

  argnums = tuple(i for i, a in enumerate(args, start=1) if a is not None)
  ours = jax.grad(loss, argnums)(bptt.recurrence, *args)
  autodiff = jax.grad(loss, argnums)(lambda *a: bptt._forward(*a)[0], *args)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), ours, autodiff)


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_bfloat16_compute_tracks_float32(cell):
  model, params = make(cell=cell, d_hidden=64)
  low, _ = make(cell=cell, d_hidden=64, dtype='bfloat16')
  tokens = jax.random.randint(jax.random.key(2), (4, 16), 0, 11)

  def loss(m, p):
    logits = m.apply({'params': p}, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  l32, g32 = jax.value_and_grad(lambda p: loss(model, p))(params)
  l16, g16 = jax.value_and_grad(lambda p: loss(low, p))(params)
  assert abs(float(l16) - float(l32)) < 1e-2
  for a, b in zip(jax.tree.leaves(g32), jax.tree.leaves(g16), strict=True):
    assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(a) + 1e-6
  # The kernels' gradients are accumulated and returned in float32, not rounded to bf16.
  for name in ('input_kernel', 'recurrent_kernel'):
    grad = np.asarray(g16['block_1']['layer'][name])
    assert (grad != grad.astype(jnp.bfloat16).astype(np.float32)).any(), name


@pytest.mark.parametrize('cell', ['lstm', 'gru'])
def test_unroll_does_not_matter(cell):
  model, params = make(cell=cell, residual=True)
  unrolled, _ = make(cell=cell, residual=True, unroll=8)
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 11)
  full = jax.jit(lambda t: model.apply({'params': params}, t))(tokens)

  def loss(m, p):
    logits = m.apply({'params': p}, tokens)
    return jnp.mean(logits**2), logits

  g1, _ = jax.jit(jax.grad(lambda p: loss(model, p), has_aux=True))(params)
  g8, logits8 = jax.jit(jax.grad(lambda p: loss(unrolled, p), has_aux=True))(params)
  np.testing.assert_allclose(logits8, full, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g1, g8)


def test_end_of_sequence_restarts_the_state():
  model, params = make(eos_id=0)
  tokens = jnp.array([[5, 6, 7, 0, 3, 4]])
  after = model.apply({'params': params}, tokens)[:, 3:]
  fresh = model.apply({'params': params}, tokens[:, 3:])
  np.testing.assert_allclose(after, fresh, atol=1e-6)


def test_flops_per_token_counts_the_matmuls():
  model, _ = make(cell='lstm', num_layers=2, d_embed=8, d_hidden=16)
  # Layer 1: (8 + 16) x 64, layer 2: (16 + 16) x 64, head: 16 x 11; two FLOPs a multiply-add.
  assert model.flops_per_token(100) == 2 * (24 * 64 + 32 * 64 + 16 * 11)


def stateful_config(text_file, **kw):
  cfg = tiny_config(text_file, **{'stateful': True, 'num_train_steps': 6, **kw})
  cfg.optim.decay_steps = 6  # the same schedule whether the run stops at 3 or not
  cfg.log_every_steps = 1
  cfg.data.sampling = 'sequential'
  cfg.model = models.default_config('rnn')
  cfg.model.num_layers, cfg.model.d_embed, cfg.model.d_hidden = 1, 8, 16
  return cfg


def test_stateful_run_resumed_equals_uninterrupted(text_file, tmp_path):
  straight = stateful_config(text_file)
  train.train_and_evaluate(straight, str(tmp_path / 'straight'))
  train.train_and_evaluate(stateful_config(text_file, num_train_steps=3), str(tmp_path / 'resumed'))
  train.train_and_evaluate(stateful_config(text_file), str(tmp_path / 'resumed'))
  losses = lambda d: {
    m['step']: m['train/loss'] for m in read_jsonl(d / 'metrics.jsonl') if 'train/loss' in m
  }
  assert losses(tmp_path / 'straight') == losses(tmp_path / 'resumed')
  # The carry is really used: the same run without it trains differently.
  fresh = stateful_config(text_file)
  fresh.stateful = False
  train.train_and_evaluate(fresh, str(tmp_path / 'fresh'))
  assert losses(tmp_path / 'fresh')[1] == losses(tmp_path / 'straight')[1]  # both start at 0
  assert losses(tmp_path / 'fresh')[6] != losses(tmp_path / 'straight')[6]


def collectives_in_loops(hlo: str) -> tuple[int, int]:
  """(all-gathers in the whole program, all-gathers in while loops' bodies and anything they
  call) in a compiled program's HLO text."""
  bodies = dict(re.findall(r'^(?:ENTRY )?%(\S+) .*?\{\n(.*?)^\}', hlo, re.M | re.S))
  loops = set(re.findall(r'body=%([\w.\-]+)', hlo))
  seen, todo = set(), list(loops)
  while todo:
    name = todo.pop()
    if name not in seen and name in bodies:
      seen.add(name)
      todo.extend(n for n in re.findall(r'%([\w.\-]+)', bodies[name]) if n in bodies)
  gathers = lambda text: len(re.findall(r'all-gather(?:-start)?\(', text))
  return gathers(hlo), sum(gathers(bodies[n]) for n in seen)


def test_fsdp_gathers_the_weights_once_per_step_outside_the_time_loops(text_file, tmp_path):
  cfg = family_config(text_file, 'rnn', **{'mesh.data': 1, 'mesh.fsdp': 8})
  run = run_lib.setup(cfg, str(tmp_path))
  abstract, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, cfg)
  trainer = train.Trainer(run, shardings)
  hlo = trainer.compile(abstract, trainer.abstract_batches(1)).as_text()
  assert hlo.count('while(') >= 4  # each layer's forward and backward loops
  everywhere, in_loops = collectives_in_loops(hlo)
  assert everywhere >= 4 and in_loops == 0, (everywhere, in_loops)
