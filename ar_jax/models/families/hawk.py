"""Hawk (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for
Efficient Language Models"): residual blocks of the Real-Gated Linear Recurrent Unit.

The RG-LRU, on its input x_t (E wide), with sigmoid gates from x_t alone:

  r_t = s(W_a x_t + b_a)            recurrence gate
  i_t = s(W_x x_t + b_x)            input gate
  a_t = a^(c r_t), a = s(L)         log a_t = -c r_t softplus(-L), c = 8
  h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)

W_a and W_x are block-diagonal over `heads` blocks, and a^c starts uniform in [0.9, 0.999]
(the paper's choices). The recurrence is linear in h, so it runs as one associative scan
(recurrence.affine_scan). At a document start a_t is set to 0 for the h_{t-1} term alone, so
a document's first state is what it would be from a zero state (the paper's code also drops
the sqrt(1 - a_t^2) there; keeping it makes a packed document equal the same document alone).

Each layer is the paper's residual block: x + W_o (GeLU(W_g y) * RG-LRU(Conv4(W_u y))),
y = LN(x), a temporal-mixing branch E wide beside a GeLU gate, then x + W_d (GeLU(W_1 y) *
W_2 y), y = LN(x), the gated MLP, F wide. The paper uses RMSNorm; LayerNorm here, as every
other family here, so the comparison changes the mixing alone.

Dimension legend: B batch, T time, D model width, E recurrence width, H heads (the gates'
diagonal blocks), J = E / H, K conv width, F MLP width, V vocab.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.errors import check
from ar_jax.models import contract, layers, numerics, recurrence, stack

C = 8.0  # the recurrence gate's exponent scale, c
A_RANGE = (0.9, 0.999)  # a^c at initialisation, uniform in it

# The recurrence is elementwise in the state and its gates are block-diagonal, so tensor
# parallelism splits the state (by heads) and the MLP with no collective inside the scan:
# one all-reduce after each block's W_o and one after its MLP, as in Megatron's transformer.
RULES = (
  ('rnn', 'tensor'),
  ('rnn_heads', 'tensor'),
  ('rnn_block', 'fsdp'),
  ('mlp', 'tensor'),
)
# d_model 128: matmul-bound, as a real model is, since the contract tests check the FLOP
# count (matmuls only) against XLA's, which counts the scan's elementwise work too.
TINY = {'hawk': dict(num_layers=2, d_model=128, d_rnn=192, heads=4)}
# The RG-LRU's L sets its decay rates: see contract.Capabilities.no_decay.
CAPABILITIES = contract.Capabilities(width=('d_model',), no_decay=('a_param',))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(stack.StackConfig, numerics.NumericsConfig):  # the scan runs in float32
  vocab_size: int  # decided by the tokenizer
  eos_id: int | None = None  # decided by the tokenizer: the state restarts at this token
  num_layers: int = 4
  d_model: int = 128  # residual stream width
  d_rnn: int = 0  # recurrence width E; 0: the multiple of heads nearest 4/3 d_model (Hawk's)
  heads: int = 4  # diagonal blocks of the gates' weights
  conv_width: int = 4  # the causal convolution before the recurrence
  d_ff: int = 0  # gated MLP width; 0: 3 * d_model (Hawk's expansion)
  dropout: float = 0.0  # on the residual branches

  def __post_init__(self):
    for name in ('vocab_size', 'num_layers', 'd_model', 'heads', 'conv_width'):
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}')
    for name in ('d_rnn', 'd_ff'):
      check(getattr(self, name) >= 0, f'model.{name} must be >= 0, got {getattr(self, name)}')
    check(
      self.rnn_width % self.heads == 0,
      f'model.d_rnn={self.rnn_width} must be a multiple of model.heads={self.heads}',
    )
    check(0.0 <= self.dropout < 1.0, f'model.dropout must be in [0, 1), got {self.dropout}')
    self.check_numerics()
    self.check_stack(self.num_layers)

  @property
  def rnn_width(self) -> int:
    return self.d_rnn or self.heads * max(1, round(4 * self.d_model / (3 * self.heads)))

  @property
  def ff_width(self) -> int:
    return self.d_ff or 3 * self.d_model


def _a_param_init(key, shape, dtype=jnp.float32):
  """L with s(L)^c uniform in A_RANGE."""
  a_c = jax.random.uniform(key, shape, dtype, *A_RANGE)
  a = a_c ** (1 / C)
  return jnp.log(a) - jnp.log1p(-a)


@jax.custom_jvp
def _sqrt_bounded(x):
  """sqrt(x) whose derivative is capped at 1,000, as Griffin's code does: as a_t -> 1 the
  derivative of sqrt(1 - a_t^2) is unbounded."""
  return jnp.sqrt(x)


@_sqrt_bounded.defjvp
def _sqrt_bounded_jvp(primals, tangents):
  (x,), (dx,) = primals, tangents
  y = jnp.sqrt(x)
  return y, dx * jnp.minimum(0.5 / jnp.maximum(y, 1e-30), 1000.0)


def rg_lru_coefficients(x_BTE, gate_a_BTE, gate_x_BTE, a_param_E):
  """(a_t, b_t) of h_t = a_t h_{t-1} + b_t, from the input and the gates' pre-activations."""
  log_a_BTE = -C * jax.nn.sigmoid(gate_a_BTE) * jax.nn.softplus(-a_param_E)
  scale_BTE = _sqrt_bounded(-jnp.expm1(2 * log_a_BTE))  # sqrt(1 - a^2)
  return jnp.exp(log_a_BTE), scale_BTE * jax.nn.sigmoid(gate_x_BTE) * x_BTE


class RGLRU(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x_BTE, h0_BE, keep_BT):
    B, T, E = x_BTE.shape
    H, J = self.heads, E // self.heads
    # Both gates' blocks in one kernel, [H, J, 2, J]: tensor parallelism splits the heads,
    # fsdp each block's input axis.
    # The gates run in float32: they set decays a^(c r_t) near 1, which bf16 would round.
    kernel = self.param(
      'gates', layers.dense_init(('rnn_heads', 'rnn_block', None, None), J**-0.5), (H, J, 2, J)
    )
    bias = self.param('gates_bias', layers.zeros_init((None, 'rnn')), (2, E))
    a_param = self.param('a_param', layers.partitioned(_a_param_init, ('rnn',)), (E,))
    x_BTHJ = x_BTE.astype(jnp.float32).reshape(B, T, H, J)
    gates_BT2E = jnp.einsum('bthi,hikj->btkhj', x_BTHJ, kernel).reshape(B, T, 2, E) + bias
    a_BTE, b_BTE = rg_lru_coefficients(
      x_BTHJ.reshape(B, T, E), gates_BT2E[:, :, 0], gates_BT2E[:, :, 1], a_param
    )
    a_BTE = jnp.where(keep_BT[..., None], a_BTE, 0.0)  # a document starts: h_{t-1} is dropped
    return recurrence.affine_scan(a_BTE, b_BTE, h0_BE)


class Block(nn.Module):
  """x + W_o (GeLU gate * RG-LRU(conv(W_u LN(x)))), then x + gated MLP(LN(x)). The cache is
  (h [B, E], the convolution's last K - 1 inputs [B, K - 1, E])."""

  config: Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, cache, ctx):
    cfg = self.config
    p = cfg.policy
    keep_BT = ctx['keep']
    h0_BE, tail_BKE = (None, None) if cache is None else cache
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    residual_std = 0.02 / (2 * cfg.num_layers) ** 0.5  # as GPT-2's residual projections
    y_BTD = layers.layer_norm(p.activations, name='ln_rnn')(x_BTD)
    in_BT2E = layers.Dense((2, cfg.rnn_width), ('embed', None, 'rnn'), policy=p, name='rnn_in')(
      y_BTD
    )
    gate_BTE = nn.gelu(in_BT2E[:, :, 0], approximate=True)
    u_BTE, tail_BKE = recurrence.CausalConv(cfg.conv_width, (None, 'rnn'), name='conv')(
      in_BT2E[:, :, 1], tail_BKE, keep_BT
    )
    if h0_BE is None:
      h0_BE = jnp.zeros((x_BTD.shape[0], cfg.rnn_width), jnp.float32)
    h_BTE = RGLRU(cfg.heads, name='rg_lru')(u_BTE, h0_BE, keep_BT)
    h_BTE = nn.with_logical_constraint(h_BTE, ('batch', 'length', 'rnn'))
    out = layers.Dense(
      (cfg.d_model,), ('rnn', 'embed'), init_std=residual_std, policy=p, name='rnn_out'
    )
    x_BTD = x_BTD + drop(out((h_BTE * gate_BTE).astype(p.activations)))
    y_BTD = layers.layer_norm(p.activations, name='ln_mlp')(x_BTD)
    up_BT2F = layers.Dense((2, cfg.ff_width), ('embed', None, 'mlp'), policy=p, name='mlp_in')(
      y_BTD
    )
    mlp_out = layers.Dense(
      (cfg.d_model,), ('mlp', 'embed'), init_std=residual_std, policy=p, name='mlp_out'
    )
    x_BTD = x_BTD + drop(mlp_out(nn.gelu(up_BT2F[:, :, 0], approximate=True) * up_BT2F[:, :, 1]))
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    return x_BTD, None if cache is None else (h_BTE[:, -1], tail_BKE)

  @staticmethod
  def layer_cache(cfg: Config, batch_size: int, max_len: int, layer: int | None) -> tuple:
    del max_len, layer  # a recurrence's state does not grow; every layer's alike
    return (
      jnp.zeros((batch_size, cfg.rnn_width), jnp.float32),
      jnp.zeros((batch_size, cfg.conv_width - 1, cfg.rnn_width), jnp.float32),
    )


class Model(recurrence.ResidualStack):
  """Embedding -> residual Hawk blocks -> LayerNorm -> logits."""

  BLOCK = Block

  def layer_flops(self) -> int:
    """W_u and W_g, the gates' blocks, W_o; the gated MLP's three matrices."""
    cfg = self.config
    D, E, F = cfg.d_model, cfg.rnn_width, cfg.ff_width
    return 2 * (2 * D * E + 2 * E * E // cfg.heads + E * D) + 2 * 3 * D * F
