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


def accumulation(dtype) -> jnp.dtype:
  """Products of `dtype` operands are summed in float32 at least (float64 under x64)."""
  return jnp.promote_types(jnp.float32, dtype)


def activation_dtype(dtype) -> jnp.dtype:
  """The dtype activations are kept in between matmuls, under compute dtype `dtype`.

  On GPUs and TPUs, `dtype` itself: half-precision activations halve the memory traffic the
  elementwise work is bound by, and keep the backward pass's matmuls in half precision (a
  float32 cotangent made GPT-2's backward 1.5x slower on an H200).
  On a CPU, float32 (at least): `dtype` is the matmul operands' alone, cast as they enter.
  XLA:CPU runs bf16 x bf16 -> float32 matmuls on the AMX units, several times faster than
  float32 ones, but a CPU's vector units run elementwise bf16 no faster than float32, and
  each conversion is one more pass: the nanogpt_cpu GPT trained slower in bf16 than float32
  with bf16 activations.
  """
  if jax.default_backend() == 'cpu':
    return accumulation(dtype)
  return jnp.dtype(dtype)


def matmul(a, b, dtype, transpose_b: bool = False, out_dtype=None):
  """a @ b, or a @ b^T with transpose_b (b's last two axes swapped), batched over any leading
  axes both share: operands in the compute dtype, accumulated in float32 (or wider) on every
  platform, returned in out_dtype (default activation_dtype(dtype))."""
  dtype = jnp.dtype(dtype)
  out_dtype = jnp.dtype(out_dtype or activation_dtype(dtype))
  if out_dtype == dtype:  # a half-precision result keeps the gradient's products in it
    return _dot(a.astype(dtype), b.astype(dtype), transpose_b, dtype)
  check(out_dtype == accumulation(dtype), f'a matmul of {dtype} operands to {out_dtype}')
  return _half_matmul(dtype, transpose_b, a, b)


def _dot(a, b, transpose_b: bool, out_dtype=None):
  """The product as one dot_general with its contracting axes named, accumulated in float32
  (or wider) and returned in out_dtype (default that). Written as a transpose and a matmul,
  XLA:CPU lays the transpose out as a column-major view, which its bf16 matmul kernels
  (YNNPACK's) do not take."""
  batch = tuple(range(a.ndim - 2))
  contract = ((a.ndim - 1,), (b.ndim - (1 if transpose_b else 2),))
  out_dtype = out_dtype or accumulation(a.dtype)
  return jax.lax.dot_general(a, b, (contract, (batch, batch)), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _half_matmul(dtype, transpose_b, a, b):
  """matmul where the result is wider than the operands (half precision on a CPU). The
  gradient's two products take the cotangent in `dtype` too: autodiff would pair the float32
  cotangent with a widened operand, a float32 product off the CPU's bf16 units."""
  return _half_matmul_fwd(dtype, transpose_b, a, b)[0]


def _half_matmul_fwd(dtype, transpose_b, a, b):
  a_half, b_half = a.astype(dtype), b.astype(dtype)
  # Zero-size stand-ins carry the operands' own dtypes (float32 parameters get float32
  # gradients) to the backward pass.
  dtypes = (jnp.zeros(0, a.dtype), jnp.zeros(0, b.dtype))
  return _dot(a_half, b_half, transpose_b), (a_half, b_half, *dtypes)


def _half_matmul_bwd(dtype, transpose_b, residuals, g):
  a, b, a_like, b_like = residuals
  g = g.astype(dtype)
  if transpose_b:  # out = a b^T: da = g b, db = g^T a
    da, db = _dot(g, b, False), _dot(swapped(g, -1, -2), a, False)
  else:  # out = a b: da = g b^T, db = a^T g
    da, db = _dot(g, b, True), _dot(swapped(a, -1, -2, witness=g), g, False)
  return da.astype(a_like.dtype), db.astype(b_like.dtype)


_half_matmul.defvjp(_half_matmul_fwd, _half_matmul_bwd)


def swapped(x, axis1: int, axis2: int, witness=None):
  """jnp.swapaxes(x, axis1, axis2), materialised in row-major order on a CPU.

  XLA:CPU's bf16 matmul kernels (YNNPACK's) take operands in row-major layout only, summed
  over the left one's last axis; XLA lays a plain transpose out as a column-major view where
  it can, and the product then runs upcast to float32, at a quarter of the speed (a weight's
  gradient x^T g, attention's products over heads). Computed inside a conditional, the
  transpose is materialised. The predicate has to be one XLA cannot decide while compiling:
  the first element of `witness` (default x) is not NaN; when it is, the result is NaN in
  every element rather than in some.
  """
  if jax.default_backend() != 'cpu':
    return jnp.swapaxes(x, axis1, axis2)
  first = (x if witness is None else witness).reshape(-1)[0]
  nan = jnp.full(jnp.swapaxes(x, axis1, axis2).shape, jnp.nan, x.dtype)
  swap = lambda x: jnp.swapaxes(x, axis1, axis2)
  return jax.lax.cond(first == first, swap, lambda x: nan, x)


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
  dtype, f32 = q_BTHK.dtype, accumulation(q_BTHK.dtype)
  q_BHTK, k_BHSK, v_BHSK = (swapped(x.astype(dtype), 1, 2) for x in (q_BTHK, k_BSHK, v_BSHK))
  scores_BHTS = matmul(q_BHTK, k_BHSK, dtype, transpose_b=True, out_dtype=f32)
  scores_BHTS = scores_BHTS / jnp.sqrt(jnp.asarray(q_BTHK.shape[-1], f32))
  scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, -jnp.inf)
  probs_BHTS = dropout(jax.nn.softmax(scores_BHTS, axis=-1))
  out_BHTK = matmul(probs_BHTS, v_BHSK, dtype, out_dtype=f32)
  return swapped(out_BHTK, 1, 2).astype(activation_dtype(dtype))


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
    q_BTHK, k_BSHK, v_BSHK = (a.astype(self.dtype) for a in (q_BTHK, k_BSHK, v_BSHK))

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
