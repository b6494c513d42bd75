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
from ar_jax.models import layers
from ar_jax.parallel import pipeline as pipeline_lib

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


@dataclasses.dataclass(frozen=True)
class Config:
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
  scan_layers: bool = False  # one scanned block (a 'layers' param axis): fast compiles
  remat: str = 'none'  # 'none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable'
  dtype: str = 'float32'  # compute dtype ('bfloat16' on accelerators); params stay float32
  # 'xla' or 'cudnn' (jax.nn.dot_product_attention; cudnn: the fused flash kernel of NVIDIA
  # GPUs, half precision), 'einsum' (written out), or 'auto': per platform, see
  # layers.attention_implementation.
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
    layers.check_remat(self.remat)
    check(0.0 <= self.dropout < 1.0, f'model.dropout must be in [0, 1), got {self.dropout}')
    layers.check_dtype(self.dtype)
    layers.attention_implementation(self.attention, self.dtype)

  @property
  def ff_width(self) -> int:
    return self.d_ff or 4 * self.d_model


class Block(nn.Module):
  """x + attn(LN(x)), then x + mlp(LN(x)). Returns (x, new layer cache)."""

  config: Config
  deterministic: bool = True

  @nn.compact
  def __call__(self, x_BTD, cache, positions, segment_ids_BT):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    act = layers.activation_dtype(dtype)
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
      dtype=dtype,
      implementation=layers.attention_implementation(cfg.attention, dtype),
      name='attn',
    )(layers.layer_norm(act, cfg.use_bias, 'ln_attn')(x_BTD), positions, cache, segment_ids_BT)
    x_BTD = x_BTD + drop(h_BTD)
    mlp_in = layers.Dense(
      (cfg.ff_width,), ('embed', 'mlp'), use_bias=cfg.use_bias, dtype=dtype, name='mlp_in'
    )
    mlp_out = layers.Dense(
      (cfg.d_model,),
      ('mlp', 'embed'),
      use_bias=cfg.use_bias,
      init_std=residual_std,
      dtype=dtype,
      name='mlp_out',
    )
    ln_mlp = layers.layer_norm(act, cfg.use_bias, 'ln_mlp')
    # GELU's tanh form: XLA:CPU runs the whole train step 13% slower with the erf form.
    h_BTD = mlp_out(nn.gelu(mlp_in(ln_mlp(x_BTD)), approximate=True))
    x_BTD = x_BTD + drop(h_BTD)
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    return x_BTD, cache


def _positions(tokens_BT, segment_ids_BT):
  """0 .. T-1 for every row ([T]), or each packed document's own from 0 ([B, T])."""
  if segment_ids_BT is None:
    return jnp.arange(tokens_BT.shape[1])
  return layers.segment_positions(segment_ids_BT)


class Model(nn.Module):
  """The model contract: __call__ for teacher forcing, init_cache + step for decoding.

  With a pipeline of several stages (which needs scan_layers), teacher forcing runs the
  blocks through its schedule (ar_jax/pipeline.py); cached decoding runs them in order.
  """

  config: Config
  deterministic: bool = True
  pipeline: pipeline_lib.Pipeline | None = None

  def setup(self):
    cfg = self.config
    if self.pipeline is not None:
      check(cfg.scan_layers, 'pipeline stages split a scanned stack: set model.scan_layers=True')
      self.pipeline.check_layers(cfg.num_layers)
    self.token_embed = layers.token_embedding(cfg.vocab_size, cfg.d_model, stddev=0.02)
    if cfg.pos_encoding == 'learned':
      self.pos_embed = self.param(
        'pos_embed',
        layers.partitioned(nn.initializers.normal(0.02), ('length', 'embed')),
        (cfg.max_len, cfg.d_model),
      )
    block = self.block_class = layers.remat(Block, cfg.remat, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.blocks = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(0, nn.broadcast, nn.broadcast),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )(cfg, self.deterministic, name='blocks')
    else:
      self.blocks = [
        block(cfg, self.deterministic, name=f'block_{i}') for i in range(cfg.num_layers)
      ]
    self.ln_out = layers.layer_norm(layers.activation_dtype(cfg.dtype), cfg.use_bias)
    if not cfg.tie_embeddings:
      self.head = layers.Dense(
        (cfg.vocab_size,),
        ('embed', 'vocab'),
        use_bias=False,
        dtype=jnp.dtype(cfg.dtype),
        name='head',
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

  def _forward(self, tokens_BT, positions, layer_caches, x_BTD=None, segment_ids_BT=None):
    cfg = self.config
    x_BTD = self._embed(tokens_BT, positions) if x_BTD is None else x_BTD
    x_BTD = self.dropout(x_BTD).astype(layers.activation_dtype(cfg.dtype))
    x_BTD = nn.with_logical_constraint(x_BTD, ('batch', 'length', 'embed'))
    if self.pipeline is not None and layer_caches is None and not self.is_initializing():
      x_BTD, new_caches = self._pipelined(x_BTD, positions, segment_ids_BT), None
    elif cfg.scan_layers:
      x_BTD, new_caches = self.blocks(x_BTD, layer_caches, positions, segment_ids_BT)
    else:
      new_caches = []
      for i, block in enumerate(self.blocks):
        cache = None if layer_caches is None else layer_caches[i]
        x_BTD, cache = block(x_BTD, cache, positions, segment_ids_BT)
        new_caches.append(cache)
    x_BTD = self.ln_out(x_BTD)
    if cfg.tie_embeddings:
      embedding_VD = self.token_embed.embedding
      logits_BTV = layers.matmul(x_BTD.reshape(-1, cfg.d_model), embedding_VD, cfg.dtype, True)
      logits_BTV = logits_BTV.reshape(*x_BTD.shape[:2], cfg.vocab_size)
    else:
      logits_BTV = self.head(x_BTD)
    # Softmax and loss always see float32 logits.
    return logits_BTV.astype(jnp.float32), new_caches

  def _pipelined(self, x_BTD, positions, segment_ids_BT):
    """The scanned blocks' layers, [L, ...], run through the pipeline's schedule."""
    B, T, _ = x_BTD.shape
    aux = {'positions': jnp.broadcast_to(positions, (B, T)), 'segment_ids': segment_ids_BT}

    def layer(params, x_bTD, aux_b, key):
      block = self.block_class(self.config, self.deterministic, parent=None)
      args = (x_bTD, None, aux_b['positions'], aux_b['segment_ids'])
      return block.apply({'params': params}, *args, rngs={} if key is None else {'dropout': key})[0]

    key = None if self.deterministic else self.make_rng('dropout')
    params, names = self.variables['params']['blocks'], ('batch', 'length', 'embed')
    return pipeline_lib.apply(layer, params, x_BTD, aux, self.pipeline, names, key)

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
    H, K = cfg.num_heads, cfg.d_model // cfg.num_heads
    one = layers.init_kv_cache(batch_size, max_len, H, K, jnp.dtype(cfg.dtype))
    if cfg.scan_layers:
      stacked = jax.tree.map(lambda a: jnp.stack([a] * cfg.num_layers), one)
    else:
      stacked = [dict(one) for _ in range(cfg.num_layers)]
    return {'index': jnp.array(0, jnp.int32), 'layers': stacked}

  @property
  def max_len(self) -> int:
    return self.config.max_len

  @property
  def cache_batch_axis(self) -> int:
    """The batch axis of every array in the cache but the scalar index (layers come first
    when they are scanned)."""
    return 1 if self.config.scan_layers else 0

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
