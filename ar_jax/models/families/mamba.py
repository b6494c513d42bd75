"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"):
residual blocks of the selective state-space model S6.

Per channel e of the E-wide input u_t, a state h_t[e] of N entries, with a diagonal A < 0 and
a step size, input and output maps chosen from u_t ("selective"):

  Delta_t = softplus(W_dt (W_r u_t) + b_dt)    [E]: low rank R, then E
  B_t = W_B u_t,  C_t = W_C u_t                [N] each, shared by the channels
  h_t = exp(Delta_t A) h_{t-1} + Bbar_t u_t,   Bbar_t = (exp(Delta_t A) - 1) / A * B_t
  y_t = C_t . h_t + D u_t

Bbar is the zero-order hold of the continuous dh/dt = A h + B u over Delta_t, exact for a
diagonal A (the paper's code takes Delta_t B_t, its first-order form). A[e, n] starts at
-(n + 1) (S4D-real) and Delta at exp(U[log 0.001, log 0.1]), the paper's choices.

The recurrence is linear in h, so it runs as an associative scan (recurrence.affine_scan) over
chunks of `chunk` positions in order (recurrence.chunked): the [B, T, E, N] states exist for
one chunk at a time, forward and backward, where a scan over all T would hold N times the
activations of the rest of the block. At a document start exp(Delta_t A) is set to 0.

Each layer is the paper's block, with no MLP: x + W_o (S6(SiLU(Conv4(W_u y))) * SiLU(W_z y)),
y = LN(x). The paper uses RMSNorm; LayerNorm here, as every other family here.

Dimension legend: B batch, T time, D model width, E inner width, N state entries per channel,
R the step size's rank, K conv width, V vocab.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.errors import check
from ar_jax.models import contract, layers, numerics, recurrence, stack

DT_RANGE = (1e-3, 1e-1)  # Delta at initialisation: log-uniform in it

# The scan is elementwise in the channels, so tensor parallelism splits them: one
# all-reduce for B_t, C_t and the step size's low-rank input (they sum over channels) and one
# after W_o. Without tensor parallelism fsdp takes the channels, as the small projections
# (W_B, W_C, W_r, W_dt) have no embed axis for it.
RULES = (('ssm', 'tensor'), ('ssm', 'fsdp'))
# d_model 128: matmul-bound, as a real model is, since the contract tests check the FLOP
# count (matmuls only) against XLA's, which counts the scan's elementwise work too; a chunk
# smaller than the tests' 12 positions, so that they run the chunked scan.
TINY = {'mamba': dict(num_layers=2, d_model=128, d_state=4, chunk=5)}
# A_log sets the decay rates and D skips the state (Gu and Dao's code exempts both): see
# contract.Capabilities.no_decay.
CAPABILITIES = contract.Capabilities(width=('d_model',), no_decay=('a_log', 'skip'))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(stack.StackConfig, numerics.NumericsConfig):  # the scan runs in float32
  vocab_size: int  # decided by the tokenizer
  eos_id: int | None = None  # decided by the tokenizer: the state restarts at this token
  num_layers: int = 4
  d_model: int = 128  # residual stream width
  expand: int = 2  # inner width E = expand * d_model
  d_state: int = 16  # N, state entries per channel
  dt_rank: int = 0  # R; 0: ceil(d_model / 16)
  conv_width: int = 4  # the causal convolution before the scan
  chunk: int = 256  # positions whose states the scan holds at once (see the module's note)
  dropout: float = 0.0  # on the residual branches

  def __post_init__(self):
    positive = ('vocab_size', 'num_layers', 'd_model', 'expand', 'd_state', 'conv_width', 'chunk')
    for name in positive:
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}')
    check(self.dt_rank >= 0, f'model.dt_rank must be >= 0, got {self.dt_rank}')
    check(0.0 <= self.dropout < 1.0, f'model.dropout must be in [0, 1), got {self.dropout}')
    self.check_numerics()
    self.check_stack(self.num_layers)

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def rank(self) -> int:
    return self.dt_rank or math.ceil(self.d_model / 16)


def discretise(delta_BTE, a_EN, b_BTN):
  """The zero-order hold of dh/dt = A h + B u over Delta, for a diagonal A < 0:
  (exp(Delta A), (exp(Delta A) - 1) / A * B), each [B, T, E, N]."""
  delta_a_BTEN = delta_BTE[..., None] * a_EN
  return jnp.exp(delta_a_BTEN), jnp.expm1(delta_a_BTEN) / a_EN * b_BTN[:, :, None]


def selective_scan(u_BTE, delta_BTE, a_EN, b_BTN, c_BTN, keep_BT, h0_BEN, chunk: int):
  """(y_t = C_t . h_t for every t, [B, T, E]; the last state, [B, E, N]), chunk by chunk."""

  def run_chunk(h0_BEN, xs):
    u_BTE, delta_BTE, b_BTN, c_BTN, keep_BT = xs
    a_BTEN, bbar_BTEN = discretise(delta_BTE, a_EN, b_BTN)
    a_BTEN = jnp.where(keep_BT[..., None, None], a_BTEN, 0.0)
    h_BTEN = recurrence.affine_scan(a_BTEN, bbar_BTEN * u_BTE[..., None], h0_BEN)
    return h_BTEN[:, -1], jnp.einsum('bten,btn->bte', h_BTEN, c_BTN)

  xs = (u_BTE, delta_BTE, b_BTN, c_BTN, keep_BT)
  h_BEN, y_BTE = recurrence.chunked(run_chunk, xs, h0_BEN, chunk)
  return y_BTE, h_BEN


def _a_log_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[1] + 1, dtype=dtype)), shape)


def _dt_bias_init(key, shape, dtype=jnp.float32):
  """softplus^-1 of Delta, log-uniform in DT_RANGE."""
  low, high = math.log(DT_RANGE[0]), math.log(DT_RANGE[1])
  dt = jnp.exp(jax.random.uniform(key, shape, dtype, low, high))
  return dt + jnp.log(-jnp.expm1(-dt))


class Block(nn.Module):
  """x + W_o (S6(SiLU(conv(W_u LN(x)))) * SiLU(W_z LN(x))). The cache is (h [B, E, N], the
  convolution's last K - 1 inputs [B, K - 1, E])."""

  config: Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, cache, ctx):
    cfg = self.config
    keep_BT = ctx['keep']
    h0_BEN, tail_BKE = (None, None) if cache is None else cache
    E, N, R = cfg.d_inner, cfg.d_state, cfg.rank
    p = cfg.policy
    residual_std = 0.02 / (2 * cfg.num_layers) ** 0.5  # as GPT-2's residual projections
    y_BTD = layers.layer_norm(p.activations, name='ln')(x_BTD)
    in_BT2E = layers.Dense((2, E), ('embed', None, 'ssm'), policy=p, name='ssm_in')(y_BTD)
    u_BTE, tail_BKE = recurrence.CausalConv(cfg.conv_width, (None, 'ssm'), name='conv')(
      in_BT2E[:, :, 0], tail_BKE, keep_BT
    )
    u_BTE = nn.silu(u_BTE).astype(jnp.float32)
    # The step size's low-rank input and B_t, C_t, from one matmul; in float32, as the scan.
    proj_BTP = layers.Dense(
      (R + 2 * N,), ('ssm', None), use_bias=False, init_std=E**-0.5, name='x_proj'
    )(u_BTE)
    dt_BTE = layers.Dense((E,), (None, 'ssm'), use_bias=False, init_std=R**-0.5, name='dt_proj')(
      proj_BTP[..., :R]
    )
    dt_bias = self.param('dt_bias', layers.partitioned(_dt_bias_init, ('ssm',)), (E,))
    a_log = self.param('a_log', layers.partitioned(_a_log_init, ('ssm', None)), (E, N))
    skip = self.param('skip', layers.ones_init(('ssm',)), (E,))
    if h0_BEN is None:
      h0_BEN = jnp.zeros((x_BTD.shape[0], E, N), jnp.float32)
    y_BTE, h_BEN = selective_scan(
      u_BTE,
      jax.nn.softplus(dt_BTE + dt_bias),
      -jnp.exp(a_log),
      proj_BTP[..., R : R + N],
      proj_BTP[..., R + N :],
      keep_BT,
      h0_BEN,
      cfg.chunk,
    )
    y_BTE = nn.with_logical_constraint(y_BTE + skip * u_BTE, ('batch', 'length', 'ssm'))
    y_BTE = y_BTE.astype(p.activations) * nn.silu(in_BT2E[:, :, 1])
    out = layers.Dense(
      (cfg.d_model,), ('ssm', 'embed'), init_std=residual_std, policy=p, name='ssm_out'
    )
    x_BTD = x_BTD + nn.Dropout(cfg.dropout, deterministic=self.deterministic)(out(y_BTE))
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    return x_BTD, None if cache is None else (h_BEN, tail_BKE)

  @staticmethod
  def layer_cache(cfg: Config, batch_size: int, max_len: int, layer: int | None) -> tuple:
    del max_len, layer  # a recurrence's state does not grow; every layer's alike
    return (
      jnp.zeros((batch_size, cfg.d_inner, cfg.d_state), jnp.float32),
      jnp.zeros((batch_size, cfg.conv_width - 1, cfg.d_inner), jnp.float32),
    )


class Model(recurrence.ResidualStack):
  """Embedding -> residual Mamba blocks -> LayerNorm -> logits."""

  BLOCK = Block

  def layer_flops(self) -> int:
    """W_u and W_z, W_B/W_C/W_r, W_dt, W_o; and the selective scan, 9 E N, as Gu and Dao
    count it (state-spaces/mamba#110): its state is N times wider than its input, so its
    elementwise work is a matmul's order (a seventh of the block's at d_model 128, N 16)."""
    cfg = self.config
    D, E, N, R = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.rank
    return 2 * (2 * D * E + E * (R + 2 * N) + R * E + E * D) + 9 * E * N
