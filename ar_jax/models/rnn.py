"""Recurrent language models: Elman RNN, LSTM and GRU on jax.lax.scan.

The Elman recurrence (Elman 1990): h_t = f(W_x x_t + W_h h_{t-1} + b_h), and p(x_{t+1} |
x_<=t) = softmax(W_y h_t + b_y). Every cell here is one matmul per step, h_{t-1} @ W_h,
followed by elementwise gates; the input projection x @ W_x of all steps is one matmul
before the loop. Backpropagation through time (Werbos 1990) is written by hand, as the
recursion r_t = f'(a_t) * (W_y^T e_t + W_h^T r_{t+1}) on the pre-activation error (e_t the
error on step t's logits), generalised to gated cells: the forward loop saves each step's
activated gates, the backward loop carries the error on the state and does one matmul per
step, and the kernels' gradients (dW_h = sum_t h_{t-1}^T dz_t) are one large matmul each
after it, instead of an accumulation inside the loop. The cells' gates and their backward
steps are in cells.py.

The recurrent stack runs time-major ([T, B, ...]): the scans index time on the leading axis,
so their inputs and stacked outputs need no transposes; only the embeddings going in and
the logits coming out are swapped.

Kernels are stored [in, out] (x @ W), so the W_x of the equations above is the transpose of
input_kernel.

Dimension legend: B batch, T time, E embedding width, D a layer's input width, S state
width, G gates * S, R the width of a step's saved gates, V vocab.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.errors import check
from ar_jax.models import cells, layers

CELLS = ('elman', 'lstm', 'gru')

# FSDP stores every weight split over fsdp (biases too: 4 x 512 LSTM gates is 2,048 floats);
# RecurrentLayer gathers them before the time loops, once per step, so the loops run no
# collective. Inside the loops the gates are laid out by 'rnn_step_gates', which no rule
# names: every device holds all of them. Splitting them over tensor instead (the override
# (('rnn_gates', 'tensor'), ('rnn_step_gates', 'tensor'))) leaves a [B, S] x [S, G/n]
# matmul per time step and a collective in every step to gather h; bench/distributed_cpu.py
# measures both. Tensor splits the output head's vocabulary.
RULES = (
  ('rnn_hidden', 'fsdp'),
  ('rnn_in', 'fsdp'),
  ('rnn_gates', 'fsdp'),
)
_TINY = dict(num_layers=2, d_embed=32, d_hidden=32)
TINY = {
  'lstm': dict(_TINY, cell='lstm'),
  'gru': dict(_TINY, cell='gru', residual=True, layer_norm=True),
  'elman': dict(_TINY, cell='elman', activation='relu'),
}


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int  # decided by the tokenizer
  eos_id: int | None = None  # decided by the tokenizer: the state restarts at this token
  cell: str = 'lstm'  # 'elman', 'lstm' or 'gru'
  num_layers: int = 2
  d_embed: int = 128  # token embedding width (the first layer's input)
  d_hidden: int = 512  # state width S of every layer
  activation: str = 'tanh'  # Elman only: 'tanh' (Elman 1990) or 'relu'
  forget_bias: float = 1.0  # LSTM only: initial forget-gate bias (Jozefowicz et al. 2015)
  residual: bool = False  # x + rnn(x) between layers of equal width
  layer_norm: bool = False  # LayerNorm on each layer's input and before the output
  dropout: float = 0.0  # between layers and before the output, never on the recurrence
  unroll: int = 1  # time steps per loop iteration of the scans (a speed knob only)
  remat: str = 'none'  # recompute each layer's loop in the backward pass: see layers.REMAT_POLICIES
  # Compute dtype of the matmuls (bfloat16, float16: reduced precision); the state and gates
  # stay in float32, or in the parameters' float64 under jax_enable_x64.
  dtype: str = 'float32'

  def __post_init__(self):
    for name in ('vocab_size', 'num_layers', 'd_embed', 'd_hidden', 'unroll'):
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}')
    check(self.cell in CELLS, f'model.cell={self.cell!r}; allowed: {", ".join(CELLS)}')
    check(
      self.activation in ('tanh', 'relu'),
      f'model.activation={self.activation!r}; allowed: tanh, relu',
    )
    check(0.0 <= self.dropout < 1.0, f'model.dropout must be in [0, 1), got {self.dropout}')
    layers.check_remat(self.remat)
    layers.check_dtype(self.dtype)


_NN = ((1,), (0,))  # a @ b
_NT = ((1,), (1,))  # a @ b.T, without materialising the transpose
_TIME_BATCH = ((0, 1), (0, 1))  # summed over time and batch: the kernels' gradients


def _matmul(a, b, dtype, contracting):
  """A matmul with operands in the compute dtype, accumulated and returned in the wider of
  float32 and it (float64 where the parameters are, under jax_enable_x64).

  The state and gates are float32, so a float32 result costs nothing; and XLA:CPU runs
  bf16 x bf16 -> float32 on the AMX units, while a bf16 result takes a path slower than
  float32 (about 2.5x and 0.9x float32's speed at these shapes).
  """
  return jax.lax.dot_general(
    a.astype(dtype),
    b.astype(dtype),
    (contracting, ((), ())),
    preferred_element_type=jnp.promote_types(jnp.float32, dtype),
  )


def _state_dtype(param_dtype) -> jnp.dtype:
  """The state's and gates' dtype: float32, or the parameters' when wider (float64)."""
  return jnp.promote_types(jnp.float32, param_dtype)


def _mask(carry, keep_B):
  return tuple(a * keep_B[:, None] for a in carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def recurrence(cell: cells.Cell, unroll: int, dtype, x_TBD, w_DG, b_G, w_SG, b_h, carry0, keep_TB):
  """Runs the cell over T steps: (outputs h_TBS, final carry).

  w_DG, b_G project the inputs, w_SG, b_h (None but for the GRU) the state; the matmuls
  compute in `dtype`. keep_TB zeroes the carry before step t where it is 0 (a document
  starts at t).
  """
  return _forward(cell, unroll, dtype, x_TBD, w_DG, b_G, w_SG, b_h, carry0, keep_TB)[0]


def _forward(cell, unroll, dtype, x_TBD, w_DG, b_G, w_SG, b_h, carry0, keep_TB, training=False):
  # The input projection of every time step, hoisted out of the loop: one large matmul. Its
  # bias is added in the loop, where it fuses into the gates instead of costing a pass.
  xz_TBG = _matmul(x_TBD, w_DG, dtype, ((2,), (0,)))
  # XLA:CPU runs the per-step [B, S] x [S, G] matmul about 10% faster against the kernel
  # transposed in memory. Training pays for the transpose once per T steps; decoding calls
  # this once per token, and XLA does not hoist the transpose out of its loop.
  w_h, dims = (w_SG.T, _NT) if training else (w_SG, _NN)
  w_h = w_h.astype(dtype)  # cast once, outside the loop

  def step(carry, inputs):
    xz_BG, keep_B = inputs
    carry = _mask(carry, keep_B)
    hz_BG = _matmul(carry[0], w_h, dtype, dims) + (0.0 if b_h is None else b_h)
    new, saved = cell.forward(xz_BG + b_G, hz_BG, carry)
    return new, (new[0], carry, saved)

  final, (h_TBS, prev_TB, saved_TBR) = jax.lax.scan(step, carry0, (xz_TBG, keep_TB), unroll=unroll)
  return (h_TBS, final), (prev_TB, saved_TBR)


def _recurrence_fwd(cell, unroll, dtype, x_TBD, w_DG, b_G, w_SG, b_h, carry0, keep_TB):
  out, (prev_TB, saved_TBR) = _forward(
    cell, unroll, dtype, x_TBD, w_DG, b_G, w_SG, b_h, carry0, keep_TB, training=True
  )
  return out, (x_TBD, w_DG, w_SG, b_h, keep_TB, prev_TB, saved_TBR)


def _recurrence_bwd(cell, unroll, dtype, residuals, cotangents):
  """Backpropagation through time: the error on the state at t is the local error from the
  output plus the error carried back from t + 1 through the cell; r_t = dz_t drives every gradient.

  The loop carries the error on the state and does one matmul per step; the gradients of
  the inputs and of the kernels are one large matmul each after it, and stay float32.
  """
  x_TBD, w_DG, w_SG, b_h, keep_TB, prev_TB, saved_TBR = residuals
  dh_TBS, dfinal = cotangents
  w_SG_c = w_SG.astype(dtype)  # cast once, outside the loop

  def step(dcarry, inputs):
    saved_BR, prev, dh_BS, keep_B = inputs
    dcarry = (dcarry[0] + dh_BS, *dcarry[1:])  # h_t is both the output and the next state
    dxz_BG, dhz_BG, dprev = cell.backward(saved_BR, prev, dcarry)
    dh_prev = dprev[0] + _matmul(dhz_BG, w_SG_c, dtype, _NT)
    # Where z = xz + hz the two errors are one array: stack it once.
    return _mask((dh_prev, *dprev[1:]), keep_B), (dxz_BG, None if dhz_BG is dxz_BG else dhz_BG)

  dcarry0, (dxz_TBG, dhz_TBG) = jax.lax.scan(
    step, dfinal, (saved_TBR, prev_TB, dh_TBS, keep_TB), reverse=True, unroll=unroll
  )
  dhz_TBG = dxz_TBG if dhz_TBG is None else dhz_TBG
  return (
    _matmul(dxz_TBG, w_DG, dtype, ((2,), (1,))).astype(x_TBD.dtype),
    _matmul(x_TBD, dxz_TBG, dtype, _TIME_BATCH),
    dxz_TBG.sum(axis=(0, 1)),
    _matmul(prev_TB[0], dhz_TBG, dtype, _TIME_BATCH),
    None if b_h is None else dhz_TBG.sum(axis=(0, 1)),
    dcarry0,
    jnp.zeros_like(keep_TB),
  )


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


class RecurrentLayer(nn.Module):
  """One recurrent layer over a time-major sequence: [T, B, D_in] and a carry -> [T, B, S]
  and a carry."""

  config: Config
  d_in: int

  @nn.compact
  def __call__(self, x_TBD, carry, keep_TB):
    cfg = self.config
    cell = cells.make_cell(cfg.cell, cfg.activation)
    S, G = cfg.d_hidden, cell.gates * cfg.d_hidden
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
    # Gathered before the loops (see RULES): one all-gather per step under FSDP.
    w_x, b_x, w_h, b_h = (
      None
      if w is None
      else nn.with_logical_constraint(w, (None,) * (w.ndim - 1) + ('rnn_step_gates',))
      for w in (w_x, b_x, w_h, b_h)
    )
    # Reduced precision where asked; otherwise the parameters' own (float64 ones stay float64).
    state = _state_dtype(w_x.dtype)
    dtype = jnp.dtype(cfg.dtype) if jnp.finfo(cfg.dtype).bits < 32 else state
    carry = tuple(c.astype(state) for c in carry)
    x_TBD, keep_TB = x_TBD.astype(jnp.promote_types(x_TBD.dtype, state)), keep_TB.astype(state)
    return recurrence(cell, cfg.unroll, dtype, x_TBD, w_x, b_x, w_h, b_h, carry, keep_TB)

  def _bias_init(self, cell: cells.Cell):
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
    self.token_embed = layers.token_embedding(cfg.vocab_size, cfg.d_embed, stddev=1.0)
    layer = layers.remat(RecurrentLayer, cfg.remat)
    self.layers = [
      layer(cfg, cfg.d_embed if i == 0 else cfg.d_hidden, name=f'layer_{i}')
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
      (cfg.vocab_size,),
      ('rnn_hidden', 'vocab'),
      init_std=cfg.d_hidden**-0.5,
      dtype=None,  # the state's: float32, or float64 under jax_enable_x64
      name='head',
    )
    self.drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)

  def embed(self, tokens_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    del segment_ids_BT  # a token's embedding does not depend on its document
    x = self.token_embed(tokens_BT)
    return x.astype(_state_dtype(x.dtype))

  def step(
    self, tokens_BT: jax.Array, cache: tuple, embeddings_BTE: jax.Array | None = None
  ) -> tuple[jax.Array, tuple]:
    """Consumes T tokens from the carries in `cache`: (logits_BTV, the carries after them)."""
    eos_id = self.config.eos_id
    # eos restarts the state.
    keep_BT = jnp.ones(tokens_BT.shape, bool) if eos_id is None else tokens_BT != eos_id
    return self._run(tokens_BT, cache, embeddings_BTE, keep_BT)

  def _run(self, tokens_BT, cache, embeddings_BTE, keep_BT):
    """step, the carries zeroed before every t where keep_BT is False (a document starts)."""
    cfg = self.config
    x_BTD = self.embed(tokens_BT) if embeddings_BTE is None else embeddings_BTE
    # Time-major inside (see the module docstring); the contract's arrays are [B, T, ...].
    x_TBD = jnp.swapaxes(x_BTD, 0, 1)
    keep_TB = keep_BT.T.astype(jnp.float32)
    new_cache = []
    for i, layer in enumerate(self.layers):
      inputs_TBD = self.norms[i](x_TBD) if cfg.layer_norm else x_TBD
      h_TBS, carry = layer(inputs_TBD, cache[i], keep_TB)
      # The cache keeps its own dtype: a decoding loop carries it unchanged.
      new_cache.append(tuple(c.astype(old.dtype) for c, old in zip(carry, cache[i], strict=True)))
      h_TBS = self.drop(h_TBS)
      x_TBD = x_TBD + h_TBS if cfg.residual and x_TBD.shape == h_TBS.shape else h_TBS
      x_TBD = nn.with_logical_constraint(x_TBD, ('length', 'batch', 'rnn_hidden'))
    if cfg.layer_norm:
      x_TBD = self.norms[-1](x_TBD)
    return jnp.swapaxes(self.readout(x_TBD), 0, 1), tuple(new_cache)

  def readout(self, h: jax.Array) -> jax.Array:
    """Output logits W_y h + b_y, in float32 (or the state's float64), for states h of any
    leading shape."""
    logits = self.head(h.astype(_state_dtype(h.dtype)))
    return logits.astype(_state_dtype(logits.dtype))

  def __call__(
    self,
    tokens_BT: jax.Array,
    embeddings_BTE: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
  ) -> jax.Array:
    """Teacher forcing from a zero state: logits_BTV. Given segment_ids_BT, the state restarts
    where each document starts: the segments mark the documents, not eos tokens."""
    cache = self.init_cache(tokens_BT.shape[0], 0)
    if segment_ids_BT is None:
      return self.step(tokens_BT, cache, embeddings_BTE)[0]
    keep_BT = ~layers.segment_starts(segment_ids_BT)
    return self._run(tokens_BT, cache, embeddings_BTE, keep_BT)[0]

  def init_cache(self, batch_size: int, max_len: int = 0) -> tuple:
    """Zero carries for every layer; the length does not matter to a recurrence."""
    del max_len
    cell = cells.make_cell(self.config.cell, self.config.activation)
    zeros = jnp.zeros((batch_size, self.config.d_hidden), jnp.float32)
    return tuple(tuple(zeros for _ in cell.state_names) for _ in range(self.config.num_layers))

  max_len = 0  # no positions: any length
  cache_batch_axis = 0
  sequential = True  # feeding back its own samples costs no more than teacher forcing

  def flops_per_token(self, seq_len: int) -> float:
    """Forward matmul FLOPs per token (the gates' elementwise work is not counted)."""
    del seq_len
    cfg = self.config
    G = cells.make_cell(cfg.cell, cfg.activation).gates * cfg.d_hidden
    total = 0
    for i in range(cfg.num_layers):
      d_in = cfg.d_embed if i == 0 else cfg.d_hidden
      total += 2 * (d_in + cfg.d_hidden) * G
    return float(total + 2 * cfg.d_hidden * cfg.vocab_size)
