"""Pieces shared by the model families: partitioned initialisers, positions, attention.

Dimension legend: B batch, T query time, S key time (cache length), D model width,
H heads, K head dim, F MLP width, V vocab.
"""

import functools
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.errors import check

Dtype = jnp.dtype

# model.remat: what a layer keeps for the backward pass; the rest it recomputes.
REMAT_POLICIES = {
  'none': None,
  'full': jax.checkpoint_policies.nothing_saveable,
  'dots_saveable': jax.checkpoint_policies.dots_saveable,
  'dots_with_no_batch_dims_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')


def check_dtype(dtype: str) -> None:
  check(dtype in COMPUTE_DTYPES, f'model.dtype={dtype!r}; allowed: {", ".join(COMPUTE_DTYPES)}')


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


def layer_norm(dtype: Dtype, use_bias: bool = True, name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the embed axis; without a bias when the model has none (as nanoGPT)."""
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
  dtype: Dtype | None = jnp.float32  # None: the wider of x's and the kernel's

  @nn.compact
  def __call__(self, x):
    lead, inner = x.shape[: -self.in_dims], x.shape[-self.in_dims :]
    init = dense_init(self.names, self.init_std)
    kernel = self.param('kernel', init, (*inner, *self.features))
    dtype = self.dtype or jnp.promote_types(x.dtype, kernel.dtype)
    n_in, n_out = math.prod(inner), math.prod(self.features)
    y = matmul(x.reshape(-1, n_in), kernel.reshape(n_in, n_out), dtype)
    y = y.reshape(*lead, *self.features)
    if self.use_bias:
      bias = self.param('bias', zeros_init(self.names[self.in_dims :]), self.features)
      y = y + bias.astype(dtype)
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


def accumulation(dtype) -> jnp.dtype:
  """Products of `dtype` operands are summed in float32 at least (float64 under x64)."""
  return jnp.promote_types(jnp.float32, dtype)


def matmul(a, b, dtype):
  """a @ b with operands in the compute dtype, returned in it: the accumulation is float32
  (or wider) on every platform.

  On a CPU the product is asked for in float32 and then cast: XLA:CPU runs bf16 x bf16 ->
  float32 on the AMX units, and a bf16 result takes a slower path than float32 itself. On
  GPUs and TPUs it is not: a float32 result makes the backward pass's matmuls float32 (its
  cotangent is float32), which on an H200 made GPT-2's backward 1.5x slower.
  """
  a, b = a.astype(dtype), b.astype(dtype)
  if jax.default_backend() != 'cpu':
    return jnp.matmul(a, b)
  return jnp.matmul(a, b, preferred_element_type=accumulation(dtype)).astype(dtype)


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


def attention_implementation(kind: str, dtype) -> str:
  """model.attention -> how attention is computed. 'xla' and 'cudnn' are
  jax.nn.dot_product_attention's implementations ('cudnn': the fused flash kernel of NVIDIA
  GPUs, in half precision); 'einsum' is the attention written out (attend_written_out).
  'auto' picks per platform: cudnn on a GPU in half precision, the written-out form on a CPU
  (XLA:CPU trains the nanogpt_cpu GPT about 15% faster with it than with
  dot_product_attention's XLA form), XLA's elsewhere."""
  check(kind in ATTENTION, f'model.attention={kind!r}; allowed: {", ".join(ATTENTION)}')
  if kind != 'auto':
    return kind
  backend = jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return 'cudnn' if half and backend == 'gpu' else 'einsum' if backend == 'cpu' else 'xla'


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


def attend_written_out(q_BTHK, k_BSHK, v_BSHK, mask_BTS, dropout):
  """attend() written out, with `dropout` on the attention weights (which the fused kernels
  do not take): scores and softmax in float32 whatever the compute dtype."""
  f32 = accumulation(q_BTHK.dtype)
  scores_BHTS = jnp.einsum('bthk,bshk->bhts', q_BTHK, k_BSHK, preferred_element_type=f32)
  scores_BHTS = scores_BHTS / jnp.sqrt(jnp.asarray(q_BTHK.shape[-1], f32))
  scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, -jnp.inf)
  probs_BHTS = dropout(jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BSHK.dtype))
  out_BTHK = jnp.einsum('bhts,bshk->bthk', probs_BHTS, v_BSHK, preferred_element_type=f32)
  return out_BTHK.astype(v_BSHK.dtype)


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention with the mask M_ij = -inf for j > i, and an optional KV cache.

  Without a cache the T tokens attend to each other; given segment_ids_BT (packed
  documents), only to those of their own document. With a cache (k and v [B, S, H, K]),
  the T new tokens, at consecutive positions [T], are written into it and attend to every
  position written so far.

  positions, [T] (every row alike) or [B, T], rotate queries and keys when `rotary`.
  `implementation` is attention_implementation's; with dropout in training, the attention is
  written out whatever it says (the fused kernels take no dropout).
  """

  num_heads: int
  rotary: bool = False
  dropout: float = 0.0
  deterministic: bool = True
  use_bias: bool = True
  out_init_std: float = 0.02
  dtype: Dtype = jnp.float32
  implementation: str = 'xla'

  @nn.compact
  def __call__(self, x_BTD, positions, cache=None, segment_ids_BT=None):
    T, D = x_BTD.shape[1:]
    H, K = self.num_heads, D // self.num_heads
    # One fused projection: three small matmuls cost XLA:CPU more than one wide one.
    qkv_BTCHK = Dense(
      (3, H, K),
      ('embed', 'qkv', 'heads', 'kv'),
      use_bias=self.use_bias,
      dtype=self.dtype,
      name='qkv',
    )(x_BTD)
    q_BTHK, k_BTHK, v_BTHK = (qkv_BTCHK[:, :, i] for i in range(3))
    if self.rotary:
      q_BTHK, k_BTHK = rotary(q_BTHK, positions), rotary(k_BTHK, positions)

    if cache is None:
      k_BSHK, v_BSHK, new_cache, mask_BTS = k_BTHK, v_BTHK, None, None
      if segment_ids_BT is not None:
        causal_TS = jnp.tril(jnp.ones((T, T), bool))
        mask_BTS = causal_TS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    else:  # decoding: one document, positions_T = index .. index + T - 1
      start = (0, positions[0], 0, 0)
      k_BSHK = jax.lax.dynamic_update_slice(cache['k'], k_BTHK.astype(cache['k'].dtype), start)
      v_BSHK = jax.lax.dynamic_update_slice(cache['v'], v_BTHK.astype(cache['v'].dtype), start)
      mask_BTS = (jnp.arange(k_BSHK.shape[1])[None, :] <= positions[:, None])[None]
      new_cache = {'k': k_BSHK, 'v': v_BSHK}
    k_BSHK, v_BSHK = k_BSHK.astype(self.dtype), v_BSHK.astype(self.dtype)

    training_dropout = self.dropout and not self.deterministic
    if training_dropout or self.implementation == 'einsum':
      if mask_BTS is None:
        mask_BTS = jnp.tril(jnp.ones((1, T, T), bool))
      drop = functools.partial(nn.Dropout(self.dropout), deterministic=self.deterministic)
      out_BTHK = attend_written_out(q_BTHK, k_BSHK, v_BSHK, mask_BTS, drop)
    else:
      causal = mask_BTS is None
      out_BTHK = attend(q_BTHK, k_BSHK, v_BSHK, mask_BTS, self.implementation, causal)
    out_BTD = Dense(
      (D,),
      ('heads', 'kv', 'embed'),
      in_dims=2,
      use_bias=self.use_bias,
      init_std=self.out_init_std,
      dtype=self.dtype,
      name='out',
    )(out_BTHK)
    return out_BTD, new_cache


def init_kv_cache(batch_size: int, max_len: int, num_heads: int, head_dim: int, dtype) -> dict:
  shape = (batch_size, max_len, num_heads, head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}
