"""Minimal recurrent language models trained in parallel over time: minGRU and minLSTM (Feng
et al. 2024, "Were RNNs All We Needed?").

Their gates read x_t only, never h_{t-1}, so each recurrence is linear in the state:

  minGRU:   z_t = s(W_z x_t), h~_t = g(W_h x_t),       h_t = (1 - z_t) h_{t-1} + z_t h~_t
  minLSTM:  f_t = s(W_f x_t), i_t = s(W_i x_t), h~_t = g(W_h x_t),
            h_t = f_t / (f_t + i_t) h_{t-1} + i_t / (f_t + i_t) h~_t

with s the sigmoid and g(x) = x + 1/2 for x >= 0, s(x) below: h~ > 0, so the state has a
logarithm. Both are h_t = a_t h_{t-1} + b_t with 0 < a_t < 1 and b_t > 0, computed for every
t at once, in log space as the paper does (Heinsen 2023): jax.lax.associative_scan of the
pairs (log a_t, log b_t) under

  (A, B) then (A', B') = (A + A', logaddexp(B + A', B')),

which gives log prod_{s<=t} a_s and log h_t from a zero state; a start state h_0 adds
prod a_s * h_0. Nothing divides, so a long product underflowing to 0 is just a vanished
past, and a document start (a_t = 0, log a_t = -inf) composes without a NaN. Decoding runs
the same scan over the new tokens from the cached h: O(1) per token.

Each layer is a pre-LayerNorm residual block as in a transformer, the recurrence in place of
attention: x + W_o minRNN(LN(x)) over a state E = expand * d_model wide, then x + MLP(LN(x))
(GELU, d_ff wide).

Dimension legend: B batch, T time, D model width, E state width, G gate vectors per step (2:
minGRU, 3: minLSTM), F MLP width, V vocab.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.errors import check
from ar_jax.models import contract, layers, numerics, recurrence, stack

CELLS = {'mingru': 2, 'minlstm': 3}  # cell -> gate vectors per step (G)

# The recurrence is elementwise in the state, so tensor parallelism splits the state (and the
# MLP) over devices with no collective inside the scan: one all-reduce after each block's
# W_o and one after its MLP, as in Megatron's transformer.
RULES = (
  ('minrnn_state', 'tensor'),
  ('mlp', 'tensor'),
)
# The first is matmul-bound, as a real model is, since the contract tests check the FLOP
# count (matmuls only) against XLA's on it: XLA counts about 300 FLOPs of the scan's
# elementwise work per state element per token, which at d_model 32 would be half the total.
TINY = {
  'mingru': dict(cell='mingru', num_layers=2, d_model=128, expand=1),
  'minlstm': dict(cell='minlstm', num_layers=2, d_model=32),
}
CAPABILITIES = contract.Capabilities(width=('d_model',))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(stack.StackConfig, numerics.NumericsConfig):  # the scan runs in float32
  vocab_size: int  # decided by the tokenizer
  eos_id: int | None = None  # decided by the tokenizer: the state restarts at this token
  cell: str = 'mingru'  # 'mingru' or 'minlstm'
  num_layers: int = 4
  d_model: int = 128  # residual stream width
  expand: int = 2  # state width E = expand * d_model
  d_ff: int = 0  # MLP width; 0 = 4 * d_model
  dropout: float = 0.0  # on the residual branches

  def __post_init__(self):
    for name in ('vocab_size', 'num_layers', 'd_model', 'expand'):
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}')
    check(self.cell in CELLS, f'model.cell={self.cell!r}; allowed: {", ".join(CELLS)}')
    check(self.d_ff >= 0, f'model.d_ff must be >= 0, got {self.d_ff}')
    check(0.0 <= self.dropout < 1.0, f'model.dropout must be in [0, 1), got {self.dropout}')
    self.check_numerics()
    self.check_stack(self.num_layers)

  @property
  def d_state(self) -> int:
    return self.expand * self.d_model

  @property
  def ff_width(self) -> int:
    return self.d_ff or 4 * self.d_model


def _log_g(x):
  """log g(x): log(x + 1/2) for x >= 0, log s(x) below."""
  return jnp.where(x >= 0, jnp.log(jnp.maximum(x, 0.0) + 0.5), -jax.nn.softplus(-x))


def log_coefficients(cell: str, gates_BTGE: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(log a, log b) [B, T, E] of h_t = a_t h_{t-1} + b_t, from the gates' pre-activations."""
  k = gates_BTGE.astype(jnp.float32)
  if cell == 'mingru':  # a = 1 - z, b = z h~
    return -jax.nn.softplus(k[:, :, 0]), -jax.nn.softplus(-k[:, :, 0]) + _log_g(k[:, :, 1])
  # minLSTM: a = f / (f + i), b = i / (f + i) h~; log(i/f) = softplus(-k_f) - softplus(-k_i).
  log_i_over_f = jax.nn.softplus(-k[:, :, 0]) - jax.nn.softplus(-k[:, :, 1])
  return -jax.nn.softplus(log_i_over_f), -jax.nn.softplus(-log_i_over_f) + _log_g(k[:, :, 2])


def _compose(first, second):
  """log b is finite (b > 0) and log a may be -inf, so the log-sum-exp below is shifted by
  the finite max: no inf - inf, and a zero gradient through a -inf term."""
  (a1, b1), (a2, b2) = first, second
  x = b1 + a2
  m = jnp.maximum(x, b2)
  return a1 + a2, m + jnp.log(jnp.exp(x - m) + jnp.exp(b2 - m))


def linear_scan(log_a_BTE, log_b_BTE, h0_BE):
  """h_t = a_t h_{t-1} + b_t for every t from h0, by the log-space associative scan, in
  float32 (at least) whatever the inputs' dtype.

  Its gradient is the linear recurrence's (recurrence.affine_scan_grad: one more scan, in
  linear space, as g has either sign and with a <= 1 cannot overflow), times a and b for
  their logarithms. Autodiff through the scan's tree of log-sum-exps gives the same values
  (tested), but XLA took half as long again to compile that under a sharded mesh."""
  dtype = numerics.accumulation(jnp.result_type(log_a_BTE, log_b_BTE, h0_BE))
  return _linear_scan(log_a_BTE.astype(dtype), log_b_BTE.astype(dtype), h0_BE.astype(dtype))


@jax.custom_vjp
def _linear_scan(log_a_BTE, log_b_BTE, h0_BE):
  return _scan_forward(log_a_BTE, log_b_BTE, h0_BE)[0]


def _scan_forward(log_a_BTE, log_b_BTE, h0_BE):
  log_decay_BTE, log_h_BTE = jax.lax.associative_scan(_compose, (log_a_BTE, log_b_BTE), axis=1)
  h_BTE = jnp.exp(log_decay_BTE) * h0_BE[:, None] + jnp.exp(log_h_BTE)
  return h_BTE, (log_a_BTE, log_b_BTE, h0_BE, h_BTE)


def _scan_backward(residuals, dh_BTE):
  log_a_BTE, log_b_BTE, h0_BE, h_BTE = residuals
  a_BTE = jnp.exp(log_a_BTE)  # 0 at a document start: nothing flows back across it
  da_BTE, db_BTE, dh0_BE = recurrence.affine_scan_grad(a_BTE, h0_BE, h_BTE, dh_BTE)
  return da_BTE * a_BTE, db_BTE * jnp.exp(log_b_BTE), dh0_BE


_linear_scan.defvjp(_scan_forward, _scan_backward)


class Block(nn.Module):
  """x + W_o minRNN(LN(x)), then x + MLP(LN(x)). The cache is the state h [B, E] after the
  last t."""

  config: Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, h0_BE, ctx):
    cfg = self.config
    p = cfg.policy
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    residual_std = 0.02 / (2 * cfg.num_layers) ** 0.5  # as GPT-2's residual projections
    gates_BTGE = layers.Dense(
      (CELLS[cfg.cell], cfg.d_state), ('embed', None, 'minrnn_state'), policy=p, name='gates'
    )(layers.layer_norm(p.activations, name='ln_rnn')(x_BTD))
    log_a_BTE, log_b_BTE = log_coefficients(cfg.cell, gates_BTGE)
    # A document starts at t: nothing of h_{t-1} is kept (a_t = 0).
    log_a_BTE = jnp.where(ctx['keep'][..., None], log_a_BTE, -jnp.inf)
    start_BE = Block.layer_cache(cfg, x_BTD.shape[0], 0, None) if h0_BE is None else h0_BE
    h_BTE = linear_scan(log_a_BTE, log_b_BTE, start_BE)
    h_BTE = nn.with_logical_constraint(h_BTE, ('batch', 'length', 'minrnn_state'))
    out = layers.Dense(
      (cfg.d_model,), ('minrnn_state', 'embed'), init_std=residual_std, policy=p, name='out'
    )
    x_BTD = x_BTD + drop(out(h_BTE))
    mlp_in = layers.Dense((cfg.ff_width,), ('embed', 'mlp'), policy=p, name='mlp_in')
    mlp_out = layers.Dense(
      (cfg.d_model,), ('mlp', 'embed'), init_std=residual_std, policy=p, name='mlp_out'
    )
    ln_mlp = layers.layer_norm(p.activations, name='ln_mlp')
    x_BTD = x_BTD + drop(mlp_out(nn.gelu(mlp_in(ln_mlp(x_BTD)), approximate=True)))
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    return x_BTD, None if h0_BE is None else h_BTE[:, -1]

  @staticmethod
  def layer_cache(cfg: Config, batch_size: int, max_len: int, layer: int | None) -> jax.Array:
    del max_len, layer  # a recurrence's state does not grow; every layer's alike
    return jnp.zeros((batch_size, cfg.d_state), jnp.float32)


class Model(recurrence.ResidualStack):
  """Embedding -> residual minGRU/minLSTM blocks -> LayerNorm -> logits. The cache is each
  layer's state h, [B, E]."""

  BLOCK = Block

  def layer_flops(self) -> int:
    cfg = self.config
    return 2 * cfg.d_model * (CELLS[cfg.cell] + 1) * cfg.d_state + 4 * cfg.d_model * cfg.ff_width
