"""Pieces shared by the recurrent families whose recurrence is linear in the state (minrnn,
hawk, mamba): the parallel scan, its chunked form, the short causal convolution with its
cached tail, and the residual language model around a stack of such blocks.

Each of them computes h_t = a_t * h_{t-1} + b_t (elementwise) for every t at once. The pairs
(a_t, b_t) are the affine maps x -> a_t x + b_t, and composing maps is associative, so
jax.lax.associative_scan gives every prefix composition in O(log T) parallel steps (Blelloch
1990; Martin & Cundy 2018 for RNNs); applied to h_0 they give every h_t. Decoding runs the
same code over the new tokens from the cached state: O(1) per token.

Dimension legend: B batch, T time, D model width, E state width, K conv width, V vocab;
`...` any trailing state axes (Mamba's state is [E, N] per position).
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.models import layers, numerics, stack


def _affine(first, second):
  """x -> a x + b, then x -> a' x + b': x -> a a' x + (a' b + b')."""
  (a1, b1), (a2, b2) = first, second
  return a1 * a2, a2 * b1 + b2


def affine_scan(a_BT_, b_BT_, h0_B_):
  """h_t = a_t h_{t-1} + b_t for every t (axis 1) from h0, by the associative scan, in
  float32 (at least) whatever the inputs' dtype: a state summed over thousands of steps
  would drift in bf16.

  Its gradient is the same recurrence backwards in time (affine_scan_grad), one more scan:
  autodiff through the scan's tree would keep every level's intermediates."""
  dtype = numerics.accumulation(jnp.result_type(a_BT_, b_BT_, h0_B_))
  return _affine_scan(a_BT_.astype(dtype), b_BT_.astype(dtype), h0_B_.astype(dtype))


@jax.custom_vjp
def _affine_scan(a_BT_, b_BT_, h0_B_):
  return _forward(a_BT_, b_BT_, h0_B_)[0]


def _forward(a_BT_, b_BT_, h0_B_):
  decay_BT_, h_BT_ = jax.lax.associative_scan(_affine, (a_BT_, b_BT_), axis=1)
  h_BT_ = decay_BT_ * h0_B_[:, None] + h_BT_
  return h_BT_, (a_BT_, h0_B_, h_BT_)


def _backward(residuals, dh_BT_):
  return affine_scan_grad(*residuals, dh_BT_)


def affine_scan_grad(a_BT_, h0_B_, h_BT_, dh_BT_):
  """(da, db, dh0) of h = affine_scan(a, b, h0) given dL/dh: with g_t = dL/dh_t +
  a_{t+1} g_{t+1} (the loss's total derivative by h_t, a scan backwards in time), db_t = g_t,
  da_t = g_t h_{t-1} and dh0 = a_1 g_1. Where a_t = 0 (a document start) nothing flows back
  across t."""
  a_next_BT_ = jnp.concatenate([a_BT_[:, 1:], jnp.zeros_like(a_BT_[:, :1])], axis=1)
  _, g_BT_ = jax.lax.associative_scan(_affine, (a_next_BT_, dh_BT_), axis=1, reverse=True)
  h_prev_BT_ = jnp.concatenate([h0_B_[:, None], h_BT_[:, :-1]], axis=1)
  return g_BT_ * h_prev_BT_, g_BT_, g_BT_[:, 0] * a_BT_[:, 0]


_affine_scan.defvjp(_forward, _backward)


def sequential_scan(a_BT_, b_BT_, h0_B_):
  """affine_scan's recurrence one step at a time, by jax.lax.scan: what the parallel scan is
  tested and timed against."""

  def step(h, ab):
    h = ab[0] * h + ab[1]
    return h, h

  _, h_TB_ = jax.lax.scan(step, h0_B_, (jnp.moveaxis(a_BT_, 1, 0), jnp.moveaxis(b_BT_, 1, 0)))
  return jnp.moveaxis(h_TB_, 0, 1)


def chunked(chunk_fn: Callable, xs: Any, h0: Any, chunk: int) -> tuple[Any, Any]:
  """chunk_fn(h, xs_chunk) -> (h after the chunk, ys_chunk), run over the time axis (axis 1
  of every leaf of xs and ys) `chunk` positions at a time, in order, carrying h.

  Each chunk is rematerialised, so what the backward pass keeps is the state at each chunk's
  start and the chunk's inputs: a scan whose state is wider than its inputs and outputs
  (Mamba's, [E, N] per position) needs memory for one chunk of states, not T of them. A last
  chunk shorter than `chunk` runs on its own, after the others."""
  length = jax.tree.leaves(xs)[0].shape[1]
  if length <= chunk:
    return chunk_fn(h0, xs)
  whole = length // chunk * chunk

  def split(x):  # [B, whole, ...] -> [whole / chunk, B, chunk, ...]
    x = x[:, :whole].reshape(x.shape[0], whole // chunk, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  def join(y):
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape(y.shape[0], whole, *y.shape[3:])

  h, ys = jax.lax.scan(jax.checkpoint(chunk_fn), h0, jax.tree.map(split, xs))
  ys = jax.tree.map(join, ys)
  if whole < length:
    h, last = chunk_fn(h, jax.tree.map(lambda x: x[:, whole:], xs))
    ys = jax.tree.map(lambda y, z: jnp.concatenate([y, z], axis=1), ys, last)
  return h, ys


class CausalConv(nn.Module):
  """y_t = bias + sum_k w_k x_{t-k}, k < K, per channel (depthwise): the short convolution
  Hawk and Mamba put before their recurrence. The last K - 1 inputs are the cache, and no
  position reads across a document start: keep_BT is False at one."""

  width: int
  names: tuple[str | None, str]  # logical axes of the kernel [K, E]

  @nn.compact
  def __call__(self, x_BTE, tail_BKE, keep_BT):
    """(y_BTE, the new tail); a tail of None is zeros, and its new tail is None."""
    K, E = self.width, x_BTE.shape[-1]
    kernel_KE = self.param('kernel', layers.dense_init(self.names, K**-0.5), (K, E))
    bias_E = self.param('bias', layers.zeros_init(self.names[1:]), (E,))
    given = tail_BKE is not None
    if not given:
      tail_BKE = jnp.zeros((x_BTE.shape[0], K - 1, E), jnp.float32)
    x_BSE = jnp.concatenate([tail_BKE.astype(x_BTE.dtype), x_BTE], axis=1)
    # The cached tail was cleared up to its last document start (below), so it starts none.
    keep_BS = jnp.pad(keep_BT, ((0, 0), (K - 1, 0)), constant_values=True)
    document_BS = jnp.cumsum(~keep_BS, axis=1)  # s is visible from t iff these are equal
    T, own_BT = x_BTE.shape[1], document_BS[:, K - 1 :]
    y_BTE = bias_E.astype(x_BTE.dtype)
    for k in range(K):  # x_{t-k} sits at t + K - 1 - k in x_BSE
      lo = K - 1 - k
      visible_BT1 = (document_BS[:, lo : lo + T] == own_BT)[..., None]
      y_BTE = y_BTE + jnp.where(visible_BT1, x_BSE[:, lo : lo + T], 0) * kernel_KE[K - 1 - k]
    if not given:
      return y_BTE, None
    visible_BK1 = (document_BS[:, T:] == document_BS[:, -1:])[..., None]
    new_tail_BKE = jnp.where(visible_BK1, x_BSE[:, T:], 0).astype(tail_BKE.dtype)
    return y_BTE, new_tail_BKE


class ResidualStack(nn.Module):
  """Embedding -> residual blocks through the layer stack, each carrying a recurrent state ->
  LayerNorm -> logits.

  A family subclasses it with BLOCK, its block class (ar_jax/models/stack.py: called as
  (x_BTD, layer_cache, ctx) -> (x_BTD, layer_cache), ctx['keep'] False where a document
  starts, where the block forgets its state; a layer_cache of None is the zero state, and
  the block then returns None for it), and `layer_flops()`, one layer's forward matmul FLOPs
  per token. Its config has vocab_size, eos_id, num_layers, d_model, dropout and the stack's
  and numerics' fields."""

  config: Any
  deterministic: bool = True

  BLOCK = None  # the subclass's block class (a class attribute, so not a module field)

  def setup(self):
    cfg = self.config
    self.token_embed = layers.token_embedding(cfg.vocab_size, cfg.d_model, stddev=0.02)
    self.stack = stack.Stack(type(self).BLOCK, cfg, cfg.num_layers, self.deterministic)
    self.ln_out = layers.layer_norm(cfg.policy.activations)
    self.head = layers.Dense(
      (cfg.vocab_size,), ('embed', 'vocab'), use_bias=False, policy=cfg.policy
    )
    self.drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)

  def embed(self, tokens_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    del segment_ids_BT  # a token's embedding does not depend on its document
    return self.token_embed(tokens_BT)

  def _run(self, tokens_BT, caches, embeddings_BTD, keep_BT):
    x_BTD = self.embed(tokens_BT) if embeddings_BTD is None else embeddings_BTD
    x_BTD = self.drop(x_BTD).astype(self.config.policy.activations)
    x_BTD, new_caches = self.stack(x_BTD, caches, {'keep': keep_BT})
    if caches is not None:  # a decoding loop carries the cache's dtypes unchanged
      new_caches = jax.tree.map(lambda n, old: n.astype(old.dtype), new_caches, caches)
    logits_BTV = self.head(self.ln_out(x_BTD))
    return logits_BTV.astype(jnp.float32), new_caches

  def step(self, tokens_BT: jax.Array, cache: Any, embeddings_BTD: jax.Array | None = None):
    """T new tokens from the cached states: (logits_BTV, the states after them). The state
    restarts at eos, which begins the next document."""
    eos_id = self.config.eos_id
    keep_BT = jnp.ones(tokens_BT.shape, bool) if eos_id is None else tokens_BT != eos_id
    return self._run(tokens_BT, cache, embeddings_BTD, keep_BT)

  def __call__(
    self,
    tokens_BT: jax.Array,
    embeddings_BTD: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
  ) -> jax.Array:
    """Teacher forcing from a zero state; given segment_ids_BT, the state restarts where
    each document starts (else at eos)."""
    if segment_ids_BT is None:
      eos_id = self.config.eos_id
      keep_BT = jnp.ones(tokens_BT.shape, bool) if eos_id is None else tokens_BT != eos_id
    else:
      keep_BT = ~layers.segment_starts(segment_ids_BT)
    return self._run(tokens_BT, None, embeddings_BTD, keep_BT)[0]

  def init_cache(self, batch_size: int, max_len: int = 0) -> Any:
    """Zero states; the length does not matter to a recurrence."""
    cfg = self.config
    return stack.init_cache(type(self).BLOCK, cfg, cfg.num_layers, batch_size, max_len)

  max_len = 0  # no positions: any length

  @property
  def cache_batch_axis(self) -> int:
    return stack.cache_batch_axis(self.config)

  sequential = False  # teacher forcing is parallel over time: feeding samples back is not

  def flops_per_token(self, seq_len: int) -> float:
    """Forward matmul FLOPs per token: the blocks' and the head's. The scans' elementwise
    work is not counted, as no family counts its elementwise work."""
    del seq_len
    cfg = self.config
    return float(cfg.num_layers * self.layer_flops() + 2 * cfg.d_model * cfg.vocab_size)
