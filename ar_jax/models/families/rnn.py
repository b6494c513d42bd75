"""Recurrent language models: Elman RNN, LSTM and GRU on jax.lax.scan.

Embedding -> a stack of recurrent layers -> p(x_{t+1} | x_<=t) = softmax(W_y h_t + b_y). A
layer's loop over time and its hand-written backpropagation through time are in bptt.py;
the cells' gates in cells.py.

The recurrent stack runs time-major ([T, B, ...]): the scans index time on the leading axis,
so their inputs and stacked outputs need no transposes; only the embeddings going in and
the logits coming out are swapped. The layers are the shared stack's blocks: the first reads
d_embed wide inputs and the others d_hidden, so a scanned (or pipelined) stack needs the two
equal.

Dimension legend: B batch, T time, E embedding width, D a layer's input width, S state
width, G gates * S, V vocab.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.errors import check
from ar_jax.models import bptt, cells, contract, layers, numerics, stack

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
  'lstm_scanned': dict(_TINY, cell='lstm', scan_layers=True, layer_norm=True),
}
CAPABILITIES = contract.Capabilities(width=('d_hidden',))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(stack.StackConfig, numerics.NumericsConfig):
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
  # (model.dtype: the matmuls' operands; the state and gates stay in float32, or in the
  # parameters' float64 under jax_enable_x64. A scanned stack needs d_embed == d_hidden.)

  def __post_init__(self):
    for name in ('vocab_size', 'num_layers', 'd_embed', 'd_hidden', 'unroll'):
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}')
    check(self.cell in CELLS, f'model.cell={self.cell!r}; allowed: {", ".join(CELLS)}')
    check(
      self.activation in ('tanh', 'relu'),
      f'model.activation={self.activation!r}; allowed: tanh, relu',
    )
    check(0.0 <= self.dropout < 1.0, f'model.dropout must be in [0, 1), got {self.dropout}')
    self.check_numerics()
    check(
      not self.scan_layers or self.d_embed == self.d_hidden,
      f'model.scan_layers stacks layers of one width: model.d_embed={self.d_embed} must equal '
      f'model.d_hidden={self.d_hidden}',
    )
    self.check_stack(self.num_layers)


class RecurrentLayer(nn.Module):
  """One recurrent layer over a time-major sequence: [T, B, D_in] and a carry -> [T, B, S]
  and a carry."""

  config: Config

  @nn.compact
  def __call__(self, x_TBD, carry, keep_TB):
    cfg = self.config
    cell = cells.make_cell(cfg.cell, cfg.activation)
    S, G = cfg.d_hidden, cell.gates * cfg.d_hidden
    w_x = self.param(
      'input_kernel',
      layers.partitioned(nn.initializers.lecun_normal(), ('rnn_in', 'rnn_gates')),
      (x_TBD.shape[-1], G),
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
    state = bptt.state_dtype(w_x.dtype)
    dtype = jnp.dtype(cfg.dtype) if jnp.finfo(cfg.dtype).bits < 32 else state
    carry = tuple(c.astype(state) for c in carry)
    x_TBD, keep_TB = x_TBD.astype(jnp.promote_types(x_TBD.dtype, state)), keep_TB.astype(state)
    return bptt.recurrence(cell, cfg.unroll, dtype, x_TBD, w_x, b_x, w_h, b_h, carry, keep_TB)

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


def _layer_norm(name=None) -> nn.LayerNorm:
  init = layers.ones_init(('rnn_in',)), layers.zeros_init(('rnn_in',))
  return nn.LayerNorm(scale_init=init[0], bias_init=init[1], name=name)


class Block(nn.Module):
  """A layer of the stack: [LayerNorm ->] recurrence -> dropout [-> + x], time-major: (x_TBD,
  carry, ctx) -> (x_TBS, carry), the carry zero where ctx['keep'] is False (a document
  starts) and, given as None, from zero (and None again)."""

  config: Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_TBD, carry, ctx):
    cfg = self.config
    zero = carry is None
    if zero:
      carry = Block.layer_cache(cfg, x_TBD.shape[1], 0, None)
    if cfg.layer_norm:
      x_in = _layer_norm('norm')(x_TBD)
    else:
      x_in = x_TBD
    layer = layers.remat(RecurrentLayer, cfg.remat)(cfg, name='layer')
    h_TBS, new = layer(x_in, carry, ctx['keep'].T.astype(jnp.float32))
    # In the dtype the cache had: a decoding loop carries it unchanged.
    new = tuple(c.astype(old.dtype) for c, old in zip(new, carry, strict=True))
    h_TBS = nn.Dropout(cfg.dropout, deterministic=self.deterministic)(h_TBS)
    x_TBD = x_TBD + h_TBS if cfg.residual and x_TBD.shape == h_TBS.shape else h_TBS
    x_TBD = nn.with_logical_constraint(x_TBD, ('length', 'batch', 'rnn_hidden'))
    return x_TBD, None if zero else new

  @staticmethod
  def layer_cache(cfg: Config, batch_size: int, max_len: int, layer: int | None) -> tuple:
    """Zero carries; the length does not matter to a recurrence."""
    del max_len, layer
    cell = cells.make_cell(cfg.cell, cfg.activation)
    return tuple(jnp.zeros((batch_size, cfg.d_hidden), jnp.float32) for _ in cell.state_names)


class Model(nn.Module):
  """Embedding -> stacked recurrent layers -> softmax(W_y h + b_y). The cache is the carry."""

  config: Config
  deterministic: bool = True

  def setup(self):
    cfg = self.config
    self.token_embed = layers.token_embedding(cfg.vocab_size, cfg.d_embed, stddev=1.0)
    names = ('length', 'batch', 'rnn_hidden')
    self.stack = stack.Stack(Block, cfg, cfg.num_layers, self.deterministic, names, batch_axis=1)
    if cfg.layer_norm:
      self.norm_out = _layer_norm()
    self.head = layers.Dense(
      (cfg.vocab_size,),
      ('rnn_hidden', 'vocab'),
      init_std=cfg.d_hidden**-0.5,
      policy=None,  # the state's: float32, or float64 under jax_enable_x64
      name='head',
    )

  def embed(self, tokens_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    del segment_ids_BT  # a token's embedding does not depend on its document
    x = self.token_embed(tokens_BT)
    return x.astype(bptt.state_dtype(x.dtype))

  def step(
    self, tokens_BT: jax.Array, cache: tuple, embeddings_BTE: jax.Array | None = None
  ) -> tuple[jax.Array, tuple]:
    """Consumes T tokens from the carries in `cache`: (logits_BTV, the carries after them)."""
    return self._run(tokens_BT, cache, embeddings_BTE, self._keep(tokens_BT))

  def _keep(self, tokens_BT):
    """False where a token restarts the state: eos."""
    eos_id = self.config.eos_id
    return jnp.ones(tokens_BT.shape, bool) if eos_id is None else tokens_BT != eos_id

  def _run(self, tokens_BT, cache, embeddings_BTE, keep_BT):
    """The stack from the carries in `cache` (None: zero), each zeroed before every t where
    keep_BT is False (a document starts)."""
    x_BTD = self.embed(tokens_BT) if embeddings_BTE is None else embeddings_BTE
    # Time-major inside (see the module docstring); the contract's arrays are [B, T, ...].
    x_TBD, new_cache = self.stack(jnp.swapaxes(x_BTD, 0, 1), cache, {'keep': keep_BT})
    x_TBS = self.norm_out(x_TBD) if self.config.layer_norm else x_TBD
    return jnp.swapaxes(self.readout(x_TBS), 0, 1), new_cache

  def readout(self, h: jax.Array) -> jax.Array:
    """Output logits W_y h + b_y, in float32 (or the state's float64), for states h of any
    leading shape."""
    logits = self.head(h.astype(bptt.state_dtype(h.dtype)))
    return logits.astype(bptt.state_dtype(logits.dtype))

  def __call__(
    self,
    tokens_BT: jax.Array,
    embeddings_BTE: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
  ) -> jax.Array:
    """Teacher forcing from a zero state: logits_BTV. Given segment_ids_BT, the state restarts
    where each document starts: the segments mark the documents, not eos tokens."""
    if segment_ids_BT is None:
      keep_BT = self._keep(tokens_BT)
    else:
      keep_BT = ~layers.segment_starts(segment_ids_BT)
    return self._run(tokens_BT, None, embeddings_BTE, keep_BT)[0]

  def init_cache(self, batch_size: int, max_len: int = 0) -> tuple:
    """Zero carries for every layer; the length does not matter to a recurrence."""
    cfg = self.config
    return stack.init_cache(Block, cfg, cfg.num_layers, batch_size, max_len)

  max_len = 0  # no positions: any length

  @property
  def cache_batch_axis(self) -> int:
    return stack.cache_batch_axis(self.config)

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
