"""Recurrent language models: Elman RNN, LSTM and GRU on jax.lax.scan.

The seeds' recurrence (000-003): h_t = f(W_x x_t + W_h h_{t-1} + b_h), and
p(x_{t+1} | x_<=t) = softmax(W_y h_t + b_y). Every cell here is one matmul per step,
h_{t-1} @ W_h, followed by elementwise gates; the input projection x @ W_x of all steps is
one matmul before the loop. Backpropagation through time is written by hand (seed 002's
boxed recursion, generalised to gated cells): the backward loop carries the error on the
state and does one matmul per step, and dW_h = sum_t h_{t-1}^T dz_t is one large matmul
after it, instead of an accumulation inside the loop.

Kernels are stored [in, out] (x @ W), so the seeds' W_x is the transpose of input_kernel.

Dimension legend: B batch, T time, E embedding width, S state width, G gates * S, V vocab.
"""

import dataclasses
import functools
from collections.abc import Callable
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.errors import check
from ar_jax.models import layers

CELLS = ('elman', 'lstm', 'gru')


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int  # decided by the tokenizer
  eos_id: int | None = None  # decided by the tokenizer: the state restarts at this token
  cell: str = 'lstm'  # 'elman', 'lstm' or 'gru'
  num_layers: int = 2
  d_embed: int = 128  # token embedding width (the first layer's input)
  d_hidden: int = 512  # state width S of every layer
  activation: str = 'tanh'  # Elman only: 'tanh' (the seeds) or 'relu'
  forget_bias: float = 1.0  # LSTM only: initial forget-gate bias (Jozefowicz et al. 2015)
  residual: bool = False  # x + rnn(x) between layers of equal width
  layer_norm: bool = False  # LayerNorm on each layer's input and before the output
  dropout: float = 0.0  # between layers and before the output, never on the recurrence
  unroll: int = 1  # time steps per loop iteration of the scans (a speed knob only)
  dtype: str = 'float32'  # compute dtype of the matmuls; state and gates stay float32

  def __post_init__(self):
    for name in ('vocab_size', 'num_layers', 'd_embed', 'd_hidden', 'unroll'):
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}')
    check(self.cell in CELLS, f'model.cell={self.cell!r}; allowed: {", ".join(CELLS)}')
    check(
      self.activation in ('tanh', 'relu'),
      f'model.activation={self.activation!r}; allowed: tanh, relu',
    )
    check(0.0 <= self.dropout < 1.0, f'model.dropout must be in [0, 1), got {self.dropout}')


class Cell(NamedTuple):
  """A recurrent cell: G projection blocks of width S, and its elementwise update.

  update(xz_BG, hz_BG, carry) -> new carry, where xz is the input projection (with its
  bias), hz = h_{t-1} @ W_h (+ recurrent bias), carry a tuple whose first entry is h.
  """

  gates: int
  update: Callable
  state_names: tuple[str, ...]
  recurrent_bias: bool = False


def _elman(activation):
  f = jnp.tanh if activation == 'tanh' else jax.nn.relu
  return Cell(1, lambda xz, hz, carry: (f(xz + hz),), ('h',))


def _lstm_update(xz, hz, carry):
  """Seed 003's gates: i, f, o = sigmoid(.), candidate = tanh(.), c = f c + i candidate,
  h = o tanh(c); '.' = W [h_{t-1}, x_t] + b, split here into hz + xz."""
  _, c = carry
  i, f, g, o = jnp.split(xz + hz, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  return jax.nn.sigmoid(o) * jnp.tanh(c), c


def _gru_update(xz, hz, carry):
  """Cho et al. (2014) with the reset gate applied after the recurrent matmul:
  n = tanh(xz_n + r * (U_n h + b_n)) rather than tanh(xz_n + U_n (r * h)).

  This is the cuDNN / PyTorch / Keras-default form. It keeps every cell at one recurrent
  matmul per step, h @ [U_r U_z U_n], which the hand-written BPTT below relies on; the
  paper's form needs a second matmul after r is known, on the sequential critical path.
  """
  (h,) = carry
  xr, xz_, xn = jnp.split(xz, 3, axis=-1)
  hr, hz_, hn = jnp.split(hz, 3, axis=-1)
  r = jax.nn.sigmoid(xr + hr)
  z = jax.nn.sigmoid(xz_ + hz_)
  n = jnp.tanh(xn + r * hn)
  return ((1.0 - z) * n + z * h,)


def make_cell(cfg: Config) -> Cell:
  if cfg.cell == 'elman':
    return _elman(cfg.activation)
  if cfg.cell == 'lstm':
    return Cell(4, _lstm_update, ('h', 'c'))
  return Cell(3, _gru_update, ('h',), recurrent_bias=True)


def _mask(carry, keep_B):
  return tuple(a * keep_B[:, None] for a in carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def recurrence(cell: Cell, unroll: int, xz_TBG, w_SG, b_G, carry0, keep_TB):
  """Runs the cell over T steps: (outputs h_TBS, final carry).

  keep_TB zeroes the carry before step t where it is 0 (a document starts at t).
  """
  return _forward(cell, unroll, xz_TBG, w_SG, b_G, carry0, keep_TB)[0]


def _forward(cell, unroll, xz_TBG, w_SG, b_G, carry0, keep_TB):
  def step(carry, inputs):
    xz_BG, keep_B = inputs
    carry = _mask(carry, keep_B)
    hz_BG = carry[0].astype(w_SG.dtype) @ w_SG
    hz_BG = hz_BG.astype(jnp.float32) + (0.0 if b_G is None else b_G)
    new = cell.update(xz_BG, hz_BG, carry)
    return new, (new[0], carry, hz_BG)

  final, (h_TBS, prev_TB, hz_TBG) = jax.lax.scan(step, carry0, (xz_TBG, keep_TB), unroll=unroll)
  return (h_TBS, final), (prev_TB, hz_TBG)


def _recurrence_fwd(cell, unroll, xz_TBG, w_SG, b_G, carry0, keep_TB):
  out, (prev_TB, hz_TBG) = _forward(cell, unroll, xz_TBG, w_SG, b_G, carry0, keep_TB)
  return out, (xz_TBG, w_SG, b_G, keep_TB, prev_TB, hz_TBG)


def _recurrence_bwd(cell, unroll, residuals, cotangents):
  """BPTT (seed 002): the error on the state at t is the local error from the output plus
  the error carried back from t + 1 through the cell; r_t = dz_t drives every gradient."""
  xz_TBG, w_SG, b_G, keep_TB, prev_TB, hz_TBG = residuals
  dh_TBS, dfinal = cotangents

  def step(dcarry, inputs):
    xz_BG, hz_BG, prev, dh_BS, keep_B = inputs
    dcarry = (dcarry[0] + dh_BS, *dcarry[1:])  # h_t is both the output and the next state
    _, vjp = jax.vjp(cell.update, xz_BG, hz_BG, prev)
    dxz_BG, dhz_BG, dprev = vjp(dcarry)
    dh_prev = dprev[0] + (dhz_BG.astype(w_SG.dtype) @ w_SG.T).astype(jnp.float32)
    return _mask((dh_prev, *dprev[1:]), keep_B), (dxz_BG, dhz_BG)

  dcarry0, (dxz_TBG, dhz_TBG) = jax.lax.scan(
    step, dfinal, (xz_TBG, hz_TBG, prev_TB, dh_TBS, keep_TB), reverse=True, unroll=unroll
  )
  h_prev_TBS = prev_TB[0]
  # One [S, T*B] x [T*B, G] matmul for the recurrent kernel's gradient.
  dw_SG = jnp.einsum('tbs,tbg->sg', h_prev_TBS.astype(w_SG.dtype), dhz_TBG.astype(w_SG.dtype))
  db_G = None if b_G is None else dhz_TBG.sum(axis=(0, 1))
  return dxz_TBG, dw_SG.astype(w_SG.dtype), db_G, dcarry0, jnp.zeros_like(keep_TB)


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


class RecurrentLayer(nn.Module):
  """One recurrent layer over a sequence: [B, T, D_in] and a carry -> [B, T, S] and a carry."""

  config: Config
  d_in: int

  @nn.compact
  def __call__(self, x_BTD, carry, keep_BT):
    cfg = self.config
    cell = make_cell(cfg)
    S, G = cfg.d_hidden, cell.gates * cfg.d_hidden
    dtype = jnp.dtype(cfg.dtype)
    w_x = self.param(
      'input_kernel',
      layers.partitioned(nn.initializers.lecun_normal(), ('rnn_in', 'rnn_gates')),
      (self.d_in, G),
    )
    b_x = self.param('bias', layers.partitioned(self._bias_init(cell), ('rnn_gates',)), (G,))
    w_h = self.param(
      'recurrent_kernel',
      layers.partitioned(_block_orthogonal(cell.gates), ('rnn_hidden', 'rnn_gates')),
      (S, G),
    )
    b_h = (
      self.param('recurrent_bias', layers.zeros_init(('rnn_gates',)), (G,))
      if cell.recurrent_bias
      else None
    )
    B, T, _ = x_BTD.shape
    # The input projection of every time step, hoisted out of the loop: one large matmul.
    xz_BTG = (x_BTD.reshape(B * T, -1).astype(dtype) @ w_x.astype(dtype)).reshape(B, T, G)
    xz_TBG = jnp.swapaxes(xz_BTG.astype(jnp.float32) + b_x, 0, 1)
    h_TBS, carry = recurrence(
      cell, cfg.unroll, xz_TBG, w_h.astype(dtype), b_h, carry, jnp.swapaxes(keep_BT, 0, 1)
    )
    return jnp.swapaxes(h_TBS, 0, 1), carry

  def _bias_init(self, cell: Cell):
    forget_bias = self.config.forget_bias if self.config.cell == 'lstm' else 0.0

    def init(key, shape, dtype=jnp.float32):
      del key
      bias = jnp.zeros(shape, dtype)
      # Gate order i, f, g, o: the second block is the forget gate.
      S = shape[0] // cell.gates
      return bias.at[S : 2 * S].set(forget_bias) if forget_bias else bias

    return init


def _block_orthogonal(blocks: int):
  """An orthogonal [S, S] matrix per gate: the recurrence starts norm-preserving."""

  def init(key, shape, dtype=jnp.float32):
    S = shape[0]
    keys = jax.random.split(key, blocks)
    return jnp.concatenate([nn.initializers.orthogonal()(k, (S, S), dtype) for k in keys], axis=1)

  return init


class Model(nn.Module):
  """Embedding -> stacked recurrent layers -> softmax(W_y h + b_y). The cache is the carry."""

  config: Config
  deterministic: bool = True

  def setup(self):
    cfg = self.config
    self.embed = layers.token_embedding(cfg.vocab_size, cfg.d_embed, stddev=1.0)
    self.layers = [
      RecurrentLayer(cfg, cfg.d_embed if i == 0 else cfg.d_hidden, name=f'layer_{i}')
      for i in range(cfg.num_layers)
    ]
    if cfg.layer_norm:
      self.norms = [
        nn.LayerNorm(
          scale_init=layers.ones_init(('rnn_in',)), bias_init=layers.zeros_init(('rnn_in',))
        )
        for _ in range(cfg.num_layers + 1)
      ]
    self.head = layers.Dense(
      (cfg.vocab_size,), ('rnn_hidden', 'vocab'), init_std=cfg.d_hidden**-0.5, name='head'
    )
    self.drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)

  def step(self, tokens_BT: jax.Array, cache: tuple) -> tuple[jax.Array, tuple]:
    """Consumes T tokens from the carries in `cache`: (logits_BTV, the carries after them)."""
    cfg = self.config
    x_BTD = self.perturb('embeddings', self.embed(tokens_BT).astype(jnp.float32))
    keep_BT = (
      jnp.ones(tokens_BT.shape, jnp.float32)
      if cfg.eos_id is None
      else (tokens_BT != cfg.eos_id).astype(jnp.float32)  # eos restarts the state
    )
    new_cache = []
    for i, layer in enumerate(self.layers):
      inputs_BTD = self.norms[i](x_BTD) if cfg.layer_norm else x_BTD
      h_BTS, carry = layer(inputs_BTD, cache[i], keep_BT)
      new_cache.append(carry)
      h_BTS = self.drop(h_BTS)
      x_BTD = x_BTD + h_BTS if cfg.residual and x_BTD.shape == h_BTS.shape else h_BTS
      x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'rnn_hidden'))
    if cfg.layer_norm:
      x_BTD = self.norms[-1](x_BTD)
    return self.readout(x_BTD), tuple(new_cache)

  def readout(self, h_BTS: jax.Array) -> jax.Array:
    """Output logits W_y h + b_y, in float32."""
    return self.head(h_BTS.astype(jnp.float32)).astype(jnp.float32)

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    """Teacher forcing from a zero state: logits_BTV."""
    return self.step(tokens_BT, self.init_cache(tokens_BT.shape[0], 0))[0]

  def init_cache(self, batch_size: int, max_len: int = 0) -> tuple:
    """Zero carries for every layer; the length does not matter to a recurrence."""
    del max_len
    cell = make_cell(self.config)
    zeros = jnp.zeros((batch_size, self.config.d_hidden), jnp.float32)
    return tuple(tuple(zeros for _ in cell.state_names) for _ in range(self.config.num_layers))

  max_len = 0  # no positions: any length
  cache_batch_axis = 0
  sequential = True  # feeding back its own samples costs no more than teacher forcing

  def flops_per_token(self, seq_len: int) -> float:
    """Forward matmul FLOPs per token (the gates' elementwise work is not counted)."""
    del seq_len
    cfg = self.config
    G = make_cell(cfg).gates * cfg.d_hidden
    total = 0
    for i in range(cfg.num_layers):
      d_in = cfg.d_embed if i == 0 else cfg.d_hidden
      total += 2 * (d_in + cfg.d_hidden) * G
    return float(total + 2 * cfg.d_hidden * cfg.vocab_size)
