"""Pieces shared by the model families: partitioned initialisers, dense layers, norms,
positions, attention.

Dimension legend: B batch, T query time, S key time (cache length), D model width,
H heads, K head dim, F MLP width, V vocab.
"""

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax import platform
from ar_jax.errors import check
from ar_jax.models import numerics
from ar_jax.models.numerics import Policy

# model.remat: what a layer keeps for the backward pass; the rest it recomputes.
REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'dots_saveable': jax.checkpoint_policies.dots_saveable,
  'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(policy: str) -> None:
  check(policy in REMAT_POLICIES, f'model.remat={policy!r}; allowed: {", ".join(REMAT_POLICIES)}')


def remat(layer: type[nn.Module], policy: str, prevent_cse: bool = True) -> type[nn.Module]:
  """The layer class, rematerialised under `policy` (unchanged for 'none'): activation memory
  then grows with the layer count by the layers' inputs alone."""
  if policy == 'none':
    return layer
  return nn.remat(layer, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)


def partitioned(init, names: Sequence[str | None]):
  """An initializer whose parameter carries logical axis names for the sharding rules."""
  return nn.with_logical_partitioning(init, tuple(names))


def dense_init(names, stddev: float = 0.02):
  return partitioned(nn.initializers.normal(stddev=stddev), names)


def zeros_init(names):
  return partitioned(nn.initializers.zeros_init(), names)


def ones_init(names):
  return partitioned(nn.initializers.ones_init(), names)


def token_embedding(vocab_size: int, width: int, stddev: float) -> nn.Embed:
  """The token embedding every family starts with, named 'embed' with axes (vocab, embed)."""
  return nn.Embed(
    vocab_size,
    width,
    embedding_init=partitioned(nn.initializers.normal(stddev), ('vocab', 'embed')),
    name='embed',
  )


def layer_norm(dtype, use_bias: bool = True, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the embed axis, computed in `dtype` (the activations'); without a bias
  when the model has none (as nanoGPT)."""
  return nn.LayerNorm(
    epsilon=1e-5,
    dtype=dtype,
    use_bias=use_bias,
    scale_init=ones_init(('embed',)),
    bias_init=zeros_init(('embed',)),
    name=name,
  )


class Dense(nn.Module):
  """y = x @ W (+ b), contracting x's last `in_dims` axes into the kernel's leading ones.

  Computed as one 2-D matmul on flattened leading axes: given 3-D operands, XLA:CPU lays out
  the weight gradient behind a transposing copy that costs more than the matmul itself.
  """

  features: tuple[int, ...]
  names: tuple[str | None, ...]  # logical axes of the kernel: input axes, then features
  in_dims: int = 1
  use_bias: bool = True
  init_std: float = 0.02
  # Operands, result and path (ar_jax/models/numerics.py); None: the wider of x's and the
  # kernel's dtype for both (float32, or float64 under jax_enable_x64).
  policy: Policy | None = numerics.FLOAT32

  @nn.compact
  def __call__(self, x):
    lead, inner = x.shape[: -self.in_dims], x.shape[-self.in_dims :]
    init = dense_init(self.names, self.init_std)
    kernel = self.param('kernel', init, (*inner, *self.features))
    p = self.policy
    if p is None:
      wide = jnp.promote_types(x.dtype, kernel.dtype)
      p = Policy(wide, wide, False)
    n_in, n_out = math.prod(inner), math.prod(self.features)
    y = numerics.matmul(x.reshape(-1, n_in), kernel.reshape(n_in, n_out), p)
    y = y.reshape(*lead, *self.features)
    if self.use_bias:
      bias = self.param('bias', zeros_init(self.names[self.in_dims :]), self.features)
      y = y + bias.astype(y.dtype)
    return y


def segment_starts(segment_ids_BT: jax.Array) -> jax.Array:
  """[B, T] bool: True where a packed document starts after the row's first position (its
  segment differs from the one before)."""
  changed_BT = segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]
  return jnp.pad(changed_BT, ((0, 0), (1, 0)))


def segment_positions(segment_ids_BT: jax.Array) -> jax.Array:
  """Each position's index inside its own document, [B, T]: t minus the position where its
  segment starts (segment ids non-decreasing along T)."""
  t_BT = jnp.broadcast_to(jnp.arange(segment_ids_BT.shape[1]), segment_ids_BT.shape)
  # The start of t's segment is the latest start at or before t: a running max over the
  # starts' indices (0 for the row's first segment, which need not start at a boundary).
  start_BT = jax.lax.cummax(jnp.where(segment_starts(segment_ids_BT), t_BT, 0), axis=1)
  return t_BT - start_BT


def sinusoidal(positions: jax.Array, d: int) -> jax.Array:
  """The sinusoidal encoding (Vaswani et al. 2017): PE(pos, 2i) = sin(pos / 10000^(2i/d)),
  PE(pos, 2i+1) = cos(same). positions [T] (every row alike) or [B, T] -> [..., T, d]."""
  two_i = jnp.arange(0, d, 2, dtype=jnp.float32)
  angle = positions[..., None].astype(jnp.float32) / jnp.power(10000.0, two_i / d)
  pe = jnp.zeros((*positions.shape, d), jnp.float32)
  pe = pe.at[..., 0::2].set(jnp.sin(angle))
  return pe.at[..., 1::2].set(jnp.cos(angle[..., : d // 2]))


def rotary(x_BTHK: jax.Array, positions: jax.Array) -> jax.Array:
  """Rotates each (first half, second half) pair of the head dim by a position angle (RoPE).
  positions [T] (every row alike) or [B, T]."""
  half = x_BTHK.shape[-1] // 2
  freq = 1.0 / (10000.0 ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = positions[..., None].astype(jnp.float32) * freq
  sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]
  x1, x2 = x_BTHK[..., :half].astype(jnp.float32), x_BTHK[..., half:].astype(jnp.float32)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


ATTENTION = ('auto', 'einsum', 'xla', 'cudnn')


def attention_implementation(kind: str, p: Policy) -> str:
  """model.attention -> how attention is computed. 'xla' and 'cudnn' are
  jax.nn.dot_product_attention's implementations ('cudnn': the fused flash kernel of NVIDIA
  GPUs, in half precision); 'einsum' is the attention written out (attend_written_out);
  'auto' is the platform's choice (ar_jax/platform.py)."""
  check(kind in ATTENTION, f'model.attention={kind!r}; allowed: {", ".join(ATTENTION)}')
  return platform.attention(kind, p.cpu, p.compute)


def attend(q_BTHK, k_BSHK, v_BSHK, mask_BTS, implementation: str, is_causal: bool = False):
  """softmax(q k^T / sqrt(K) where mask, else -inf) v, by jax.nn.dot_product_attention: the
  fused kernel where `implementation` names one. mask_BTS None with is_causal: causal."""
  return jax.nn.dot_product_attention(
    q_BTHK,
    k_BSHK,
    v_BSHK,
    mask=None if mask_BTS is None else mask_BTS[:, None],
    is_causal=is_causal,
    implementation=implementation,
  )


def attend_written_out(q_BTHK, k_BSHK, v_BSHK, mask_BTS, dropout, p: Policy):
  """attend() written out, with `dropout` on the attention weights (which the fused kernels
  do not take): scores and softmax in float32 whatever the compute dtype."""
  dtype, f32 = p.compute, p.accumulation
  q_BHTK, k_BHSK, v_BHSK = (
    numerics.swapped(x.astype(dtype), 1, 2, p) for x in (q_BTHK, k_BSHK, v_BSHK)
  )
  scores_BHTS = numerics.matmul(q_BHTK, k_BHSK, p, transpose_b=True, out_dtype=f32)
  scores_BHTS = scores_BHTS / jnp.sqrt(jnp.asarray(q_BTHK.shape[-1], f32))
  scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, -jnp.inf)
  probs_BHTS = dropout(jax.nn.softmax(scores_BHTS, axis=-1))
  out_BHTK = numerics.matmul(probs_BHTS, v_BHSK, p, out_dtype=f32)
  return numerics.swapped(out_BHTK, 1, 2, p).astype(p.activations)


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention with the mask M_ij = -inf for j > i, and an optional KV cache.

  Without a cache the T tokens attend to each other; given segment_ids_BT (packed
  documents), only to those of their own document. With a cache (k and v [B, S, H, K]),
  the T new tokens, at consecutive positions from positions_BT[0, 0], are written into it
  and attend to every position written so far.

  positions_BT rotate queries and keys when `rotary`. `implementation` is
  attention_implementation's; with dropout in training, the attention is written out whatever
  it says (the fused kernels take no dropout).
  """

  num_heads: int
  rotary: bool = False
  dropout: float = 0.0
  deterministic: bool = True
  use_bias: bool = True
  out_init_std: float = 0.02
  policy: Policy = numerics.FLOAT32
  implementation: str = 'xla'

  @nn.compact
  def __call__(self, x_BTD, positions_BT, cache=None, segment_ids_BT=None):
    T, D = x_BTD.shape[1:]
    H, K = self.num_heads, D // self.num_heads
    p = self.policy
    # One fused projection: three small matmuls cost XLA:CPU more than one wide one.
    qkv_BTCHK = Dense(
      (3, H, K), ('embed', 'qkv', 'heads', 'kv'), use_bias=self.use_bias, policy=p, name='qkv'
    )(x_BTD)
    q_BTHK, k_BTHK, v_BTHK = (qkv_BTCHK[:, :, i] for i in range(3))
    if self.rotary:
      q_BTHK, k_BTHK = rotary(q_BTHK, positions_BT), rotary(k_BTHK, positions_BT)

    if cache is None:
      k_BSHK, v_BSHK, new_cache, mask_BTS = k_BTHK, v_BTHK, None, None
      if segment_ids_BT is not None:
        causal_TS = jnp.tril(jnp.ones((T, T), bool))
        mask_BTS = causal_TS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    else:  # decoding: one document, positions index .. index + T - 1 in every row
      start = (0, positions_BT[0, 0], 0, 0)
      k_BSHK = jax.lax.dynamic_update_slice(cache['k'], k_BTHK.astype(cache['k'].dtype), start)
      v_BSHK = jax.lax.dynamic_update_slice(cache['v'], v_BTHK.astype(cache['v'].dtype), start)
      mask_BTS = jnp.arange(k_BSHK.shape[1]) <= positions_BT[:, :, None]
      new_cache = {'k': k_BSHK, 'v': v_BSHK}
    q_BTHK, k_BSHK, v_BSHK = (a.astype(p.compute) for a in (q_BTHK, k_BSHK, v_BSHK))

    training_dropout = self.dropout and not self.deterministic
    if training_dropout or self.implementation == 'einsum':
      if mask_BTS is None:
        mask_BTS = jnp.tril(jnp.ones((1, T, T), bool))
      drop = functools.partial(nn.Dropout(self.dropout), deterministic=self.deterministic)
      out_BTHK = attend_written_out(q_BTHK, k_BSHK, v_BSHK, mask_BTS, drop, p)
    else:
      causal = mask_BTS is None
      out_BTHK = attend(q_BTHK, k_BSHK, v_BSHK, mask_BTS, self.implementation, causal)
    out_BTD = Dense(
      (D,),
      ('heads', 'kv', 'embed'),
      in_dims=2,
      use_bias=self.use_bias,
      init_std=self.out_init_std,
      policy=p,
      name='out',
    )(out_BTHK)
    return out_BTD, new_cache


def init_kv_cache(batch_size: int, max_len: int, num_heads: int, head_dim: int, dtype) -> dict:
  shape = (batch_size, max_len, num_heads, head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
