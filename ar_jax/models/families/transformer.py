"""A causal decoder-only transformer (pre-LayerNorm, GELU MLP, as GPT-2) with a KV cache.

Dimension legend: B batch, T time, S cache length, D model width, H heads, K head dim,
F MLP width, V vocab, L layers.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.errors import check
from ar_jax.models import contract, layers, numerics, stack

POS_ENCODINGS = ('learned', 'sinusoidal', 'rotary')

# Megatron-style tensor parallelism (Shoeybi et al. 2019): attention is split by heads, the
# MLP by its hidden units, so each block needs one all-reduce after attention and one after
# the MLP. FSDP splits the model width ('embed', a shared rule).
RULES = (
  ('heads', 'tensor'),
  ('mlp', 'tensor'),
)
TINY = {
  'learned': dict(num_layers=2, num_heads=4, d_model=32, max_len=32),
  'rotary': dict(num_layers=2, num_heads=4, d_model=32, max_len=32, pos_encoding='rotary'),
  'sinusoidal_scanned': dict(
    num_layers=2, num_heads=4, d_model=32, max_len=32, pos_encoding='sinusoidal', scan_layers=True
  ),
}
CAPABILITIES = contract.Capabilities(width=('d_model',))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(stack.StackConfig, numerics.NumericsConfig):
  vocab_size: int  # decided by the tokenizer
  num_layers: int = 4
  num_heads: int = 4
  d_model: int = 128  # residual stream width
  d_ff: int = 0  # MLP width; 0 = 4 * d_model
  max_len: int = 256  # positions the model supports: training windows and prompt + sample
  pos_encoding: str = 'learned'  # 'learned', 'sinusoidal' (Vaswani et al. 2017) or 'rotary'
  dropout: float = 0.0  # on embeddings, attention weights and residual branches
  tie_embeddings: bool = False  # output projection = input embedding, transposed
  use_bias: bool = True  # biases in dense layers and LayerNorms
  # 'xla' or 'cudnn' (jax.nn.dot_product_attention; cudnn: the fused flash kernel of NVIDIA
  # GPUs, half precision), 'einsum' (written out), or 'auto': the platform's choice.
  attention: str = 'auto'

  def __post_init__(self):
    for name in ('vocab_size', 'num_layers', 'num_heads', 'd_model', 'max_len'):
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}')
    check(
      self.d_model % self.num_heads == 0,
      f'model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}',
    )
    check(
      self.pos_encoding in POS_ENCODINGS,
      f'model.pos_encoding={self.pos_encoding!r}; allowed: {", ".join(POS_ENCODINGS)}',
    )
    check(
      self.pos_encoding != 'rotary' or (self.d_model // self.num_heads) % 2 == 0,
      f'rotary positions need an even head dim, got {self.d_model // self.num_heads}',
    )
    check(0.0 <= self.dropout < 1.0, f'model.dropout must be in [0, 1), got {self.dropout}')
    self.check_numerics()
    self.check_stack(self.num_layers)
    layers.attention_implementation(self.attention, self.policy)

  @property
  def ff_width(self) -> int:
    return self.d_ff or 4 * self.d_model


class Block(nn.Module):
  """x + attn(LN(x)), then x + mlp(LN(x)). The cache is the layer's keys and values."""

  config: Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, cache, ctx):
    cfg = self.config
    p = cfg.policy
    drop = nn.Dropout(cfg.dropout, deterministic=self.deterministic)
    # GPT-2: projections into the residual stream start smaller, so its variance does not
    # grow with depth.
    residual_std = 0.02 / math.sqrt(2 * cfg.num_layers)
    h_BTD, cache = layers.CausalSelfAttention(
      num_heads=cfg.num_heads,
      rotary=cfg.pos_encoding == 'rotary',
      dropout=cfg.dropout,
      deterministic=self.deterministic,
      use_bias=cfg.use_bias,
      out_init_std=residual_std,
      policy=p,
      implementation=layers.attention_implementation(cfg.attention, p),
      name='attn',
    )(
      layers.layer_norm(p.activations, cfg.use_bias, 'ln_attn')(x_BTD),
      ctx['positions'],
      cache,
      ctx.get('segment_ids'),
    )
    x_BTD = x_BTD + drop(h_BTD)
    mlp_in = layers.Dense(
      (cfg.ff_width,), ('embed', 'mlp'), use_bias=cfg.use_bias, policy=p, name='mlp_in'
    )
    mlp_out = layers.Dense(
      (cfg.d_model,),
      ('mlp', 'embed'),
      use_bias=cfg.use_bias,
      init_std=residual_std,
      policy=p,
      name='mlp_out',
    )
    ln_mlp = layers.layer_norm(p.activations, cfg.use_bias, 'ln_mlp')
    # GELU's tanh form: XLA:CPU runs the whole train step slower with the erf form.
    h_BTD = mlp_out(nn.gelu(mlp_in(ln_mlp(x_BTD)), approximate=True))
    x_BTD = x_BTD + drop(h_BTD)
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    return x_BTD, cache

  @staticmethod
  def layer_cache(cfg: Config, batch_size: int, max_len: int, layer: int | None) -> dict:
    del layer  # every layer's alike
    H, K = cfg.num_heads, cfg.d_model // cfg.num_heads
    return layers.init_kv_cache(batch_size, max_len, H, K, cfg.policy.compute)


class Model(nn.Module):
  """The model contract: __call__ for teacher forcing, init_cache + step for decoding."""

  config: Config
  deterministic: bool = True

  def setup(self):
    cfg = self.config
    self.token_embed = layers.token_embedding(cfg.vocab_size, cfg.d_model, stddev=0.02)
    if cfg.pos_encoding == 'learned':
      self.pos_embed = self.param(
        'pos_embed',
        layers.partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
        (cfg.max_len, cfg.d_model),
      )
    self.stack = stack.Stack(Block, cfg, cfg.num_layers, self.deterministic)
    self.ln_out = layers.layer_norm(cfg.policy.activations, cfg.use_bias)
    if not cfg.tie_embeddings:
      self.head = layers.Dense(
        (cfg.vocab_size,), ('embed', 'vocab'), use_bias=False, policy=cfg.policy, name='head'
      )
    self.dropout = nn.Dropout(cfg.dropout, deterministic=self.deterministic)

  def _embed(self, tokens_BT, positions):
    cfg = self.config
    x_BTD = self.token_embed(tokens_BT)
    if cfg.pos_encoding == 'learned':
      x_BTD = x_BTD + jnp.take(self.pos_embed, positions, axis=0)
    elif cfg.pos_encoding == 'sinusoidal':
      x_BTD = x_BTD + layers.sinusoidal(positions, cfg.d_model)
    return x_BTD

  def embed(self, tokens_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Token plus position embeddings, [B, T, D]: positions 0 .. T-1, or with segment_ids_BT
    each document's own from 0."""
    return self._embed(tokens_BT, _positions(tokens_BT, segment_ids_BT))

  def _forward(self, tokens_BT, positions, caches, x_BTD=None, segment_ids_BT=None):
    """positions: [T] (every row alike) or [B, T]."""
    cfg = self.config
    x_BTD = self._embed(tokens_BT, positions) if x_BTD is None else x_BTD
    x_BTD = self.dropout(x_BTD).astype(cfg.policy.activations)
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    ctx = {'positions': jnp.broadcast_to(positions, tokens_BT.shape)}
    if segment_ids_BT is not None:
      ctx['segment_ids'] = segment_ids_BT
    x_BTD, caches = self.stack(x_BTD, caches, ctx)
    x_BTD = self.ln_out(x_BTD)
    if cfg.tie_embeddings:
      embedding_VD = self.token_embed.embedding
      logits_BTV = numerics.matmul(x_BTD.reshape(-1, cfg.d_model), embedding_VD, cfg.policy, True)
      logits_BTV = logits_BTV.reshape(*x_BTD.shape[:2], cfg.vocab_size)
    else:
      logits_BTV = self.head(x_BTD)
    # Softmax and loss always see float32 logits.
    return logits_BTV.astype(jnp.float32), caches

  def __call__(
    self,
    tokens_BT: jax.Array,
    embeddings_BTD: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
  ) -> jax.Array:
    """Teacher forcing: logits_BTV where position t has seen tokens <= t only (of its own
    document, given segment_ids_BT)."""
    T = tokens_BT.shape[1]
    check(
      self.config.max_len >= T, f'sequence length {T} exceeds model.max_len={self.config.max_len}'
    )
    positions = _positions(tokens_BT, segment_ids_BT)
    return self._forward(tokens_BT, positions, None, embeddings_BTD, segment_ids_BT)[0]

  def step(self, tokens_BT: jax.Array, cache: dict[str, Any]):
    """Cached decoding: feeds T new tokens (a prefill, or T = 1) and returns (logits_BTV, cache)."""
    T = tokens_BT.shape[1]
    positions_T = cache['index'] + jnp.arange(T)
    logits_BTV, layer_caches = self._forward(tokens_BT, positions_T, cache['layers'])
    return logits_BTV, {'index': cache['index'] + T, 'layers': layer_caches}

  def init_cache(self, batch_size: int, max_len: int) -> dict[str, Any]:
    """An empty cache for batch_size sequences of at most max_len positions."""
    cfg = self.config
    check(max_len <= cfg.max_len, f'{max_len} positions exceed model.max_len={cfg.max_len}')
    caches = stack.init_cache(Block, cfg, cfg.num_layers, batch_size, max_len)
    return {'index': jnp.array(0, jnp.int32), 'layers': caches}

  @property
  def max_len(self) -> int:
    return self.config.max_len

  @property
  def cache_batch_axis(self) -> int:
    return stack.cache_batch_axis(self.config)

  sequential = False

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token at this sequence length, counting matmuls as executed.

    Attention is computed densely (all T x T scores, then masked), so it costs
    4 * T * D per token per layer; training costs three times the forward.
    """
    cfg = self.config
    D, F, V, L = cfg.d_model, cfg.ff_width, cfg.vocab_size, cfg.num_layers
    per_layer = 2 * (3 * D * D + D * D + 2 * D * F) + 4 * seq_len * D
    return float(L * per_layer + 2 * D * V)


def _positions(tokens_BT, segment_ids_BT):
  """0 .. T-1 for every row ([T]), or each packed document's own from 0 ([B, T])."""
  if segment_ids_BT is None:
    return jnp.arange(tokens_BT.shape[1])
  return layers.segment_positions(segment_ids_BT)
