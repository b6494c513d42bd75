"""Causal convolutional language models: a plain causal-conv stack and WaveNet.

A causal convolution pads the past with k - 1 zeros (k taps), so output t sees inputs <= t.
WaveNet (van den Oord et al. 2016) stacks dilated causal convolutions, dilations
1, 2, ..., 2^(n-1) repeated in blocks, with the gated activation tanh(W_f * x) * sigmoid(W_g * x),
residual connections around every layer and skip connections summed into the output.
The plain causal-conv LM is the same stack with dilation 1, ReLU and no skip path.

Cached decoding is Fast WaveNet (Paine et al. 2016): every layer keeps a queue of the last
(kernel_size - 1) * dilation inputs it saw, so a new token costs O(layers) matmuls however
large the receptive field. The queue is a ring buffer: position p lives in slot p mod Q.

The layers are the shared stack's blocks. Their residual stream carries the skip sum beside it
([B, T, C + S]: residual channels, then skip channels), and a block finds its dilation from
its index in the stack: a constant when the stack is unrolled, traced when it is scanned or
pipelined, where every layer's queue has the largest dilation's length.

Dimension legend: B batch, T time, C residual channels, G conv outputs (2C gated, C plain),
S skip channels, V vocab, K kernel taps, Q queue length of a layer.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.errors import check
from ar_jax.models import contract, layers, numerics, stack

# Tensor parallelism splits the conv outputs by channel (a gated channel's filter and gate
# are adjacent, so each shard gates its own channels), and the 1x1 layers reading them by
# their inputs (Shoeybi et al. 2019): one all-reduce of the residual and skip sums per
# layer. FSDP splits the residual and skip widths; the output head falls back to fsdp.
RULES = (
  ('conv_channels', 'tensor'),
  ('conv_in', 'fsdp'),
  ('conv_skip', 'fsdp'),
  ('mlp', 'tensor'),
  ('mlp', 'fsdp'),
)
_TINY = dict(channels=32, layers_per_block=3, skip_channels=32, head_channels=32)
TINY = {
  'wavenet': _TINY,
  'plain': dict(_TINY, dilation_base=1, gated=False, skip_channels=0, num_blocks=2),
  'wavenet_scanned': dict(_TINY, scan_layers=True),
}
CAPABILITIES = contract.Capabilities(
  width=('channels', 'head_channels', 'skip_channels'), depth='layers_per_block'
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(stack.StackConfig, numerics.NumericsConfig):  # dtype: the convs and 1x1 layers'
  vocab_size: int  # decided by the tokenizer
  channels: int = 64  # residual channels C (the embedding width too)
  kernel_size: int = 2  # taps of every causal conv; WaveNet uses 2
  layers_per_block: int = 10  # dilations dilation_base^0 .. dilation_base^(layers_per_block-1)
  num_blocks: int = 1  # repeats of the dilation cycle
  dilation_base: int = 2  # 2: WaveNet's doubling dilations; 1: a plain causal-conv stack
  gated: bool = True  # tanh(W_f * x) * sigmoid(W_g * x) (WaveNet), else ReLU(W * x)
  skip_channels: int = 128  # S: width of the summed skip connections; 0 = head reads the stack
  head_channels: int = 128  # width of the output head's hidden 1x1 layer

  def __post_init__(self):
    for name in ('vocab_size', 'channels', 'layers_per_block', 'num_blocks', 'head_channels'):
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}')
    check(
      self.kernel_size >= 2,
      f'model.kernel_size must be >= 2 (1 sees no past), got {self.kernel_size}',
    )
    check(self.dilation_base >= 1, f'model.dilation_base must be >= 1, got {self.dilation_base}')
    check(self.skip_channels >= 0, f'model.skip_channels must be >= 0, got {self.skip_channels}')
    self.check_numerics()
    self.check_stack(len(self.dilations))

  @property
  def dilations(self) -> tuple[int, ...]:
    cycle = [self.dilation_base**i for i in range(self.layers_per_block)]
    return tuple(cycle * self.num_blocks)

  def dilation(self, layer):
    """Layer `layer`'s dilation: an int for an int index, traced for a traced one."""
    return self.dilation_base ** (layer % self.layers_per_block)

  def queue_len(self, layer: int | None) -> int:
    """Layer `layer`'s queue: (K - 1) d; None, a traced layer's: the largest dilation's."""
    d = max(self.dilations) if layer is None else self.dilations[layer]
    return (self.kernel_size - 1) * d

  @property
  def receptive_field(self) -> int:
    """Tokens that reach one output: (kernel_size - 1) * sum(dilations) + 1. One block of
    kernel 2 and dilations 1 .. 2^(n-1) sees 2^n: 2^L for L layers."""
    return (self.kernel_size - 1) * sum(self.dilations) + 1


class CausalConv1D(nn.Module):
  """y_t = sum_k W_k x_{t - (K-1-k) d} + b, with x_t = 0 before the sequence (or the queue).

  Without a queue: the teacher-forced form, left-padding Q zeros; given each position's index
  in its packed document (positions_BT), a tap that would read an earlier document reads
  zero instead, as the padding before a row's first one. With a queue ([B, Q, C] ring buffer
  holding positions index-Q .. index-1 in slots position mod Q): the T new inputs continue
  it, and the updated queue is returned. The dilation may be traced; Q >= (K-1) d is not.
  """

  features: int
  kernel_size: int
  dilation: Any  # int, or a traced int32
  queue_len: int
  policy: numerics.Policy = numerics.FLOAT32

  @nn.compact
  def __call__(self, x_BTC, queue_BQC=None, index=None, positions_BT=None):
    K, d = self.kernel_size, self.dilation
    p = self.policy
    kernel_KCG = self.param(
      'kernel',
      layers.partitioned(
        nn.initializers.lecun_normal(), ('conv_width', 'conv_in', 'conv_channels')
      ),
      (K, x_BTC.shape[-1], self.features),
    )
    bias_G = self.param('bias', layers.zeros_init(('conv_channels',)), (self.features,))
    x_BTC = x_BTC.astype(p.compute)
    B, T, C = x_BTC.shape
    G = self.features

    if queue_BQC is not None and T == 1:
      # Fast WaveNet: the K - 1 earlier taps are single slots of the ring, so a new token
      # reads K - 1 vectors and writes one, whatever the dilation.
      Q = queue_BQC.shape[1]
      slots_K = (index - d * jnp.arange(K - 1, 0, -1)) % Q
      window_BKC = jnp.concatenate([jnp.take(queue_BQC, slots_K, axis=1), x_BTC], axis=1)
      y_BG = numerics.matmul(window_BKC.reshape(B, -1), kernel_KCG.reshape(-1, G), p)
      new_queue = jax.lax.dynamic_update_slice_in_dim(queue_BQC, x_BTC, index % Q, axis=1)
      return y_BG[:, None] + bias_G.astype(y_BG.dtype), new_queue

    if queue_BQC is None:
      Q, new_queue = self.queue_len, None
      history_BQC = jnp.zeros((B, Q, C), p.compute)
    else:  # a prefill: the ring in time order, then the T new inputs
      Q = queue_BQC.shape[1]
      history_BQC = jnp.take(queue_BQC, (index + jnp.arange(Q)) % Q, axis=1)
    seq_BLC = jnp.concatenate([history_BQC, x_BTC], axis=1)
    # Tap k reads x_{t - (K-1-k) d} = seq[Q + t - (K-1-k) d]. The K shifted views side by
    # side make the conv one 2-D matmul [B*T, K*C] x [K*C, G]: on CPU several times faster
    # to train than lax.conv_general_dilated with rhs_dilation, whose gradients XLA:CPU
    # lowers poorly.
    taps = [jax.lax.dynamic_slice_in_dim(seq_BLC, Q - (K - 1 - k) * d, T, 1) for k in range(K)]
    taps_BTKC = jnp.stack(taps, axis=2)
    if positions_BT is not None:
      # Tap k reaches (K-1-k) d positions back: inside the output's own document only when
      # the output is at least that far into it (segments do not decrease along a row).
      inside_BTK = positions_BT[:, :, None] >= d * jnp.arange(K - 1, -1, -1)
      taps_BTKC = taps_BTKC * inside_BTK[..., None].astype(p.compute)
    y_BTG = numerics.matmul(taps_BTKC.reshape(B * T, K * C), kernel_KCG.reshape(K * C, G), p)
    y_BTG = y_BTG.reshape(B, T, G)
    if queue_BQC is not None:
      # The last Q inputs are positions index + T - Q .. index + T - 1; slot s holds the one
      # whose position is s mod Q.
      new_queue = jnp.take(seq_BLC[:, T:], (jnp.arange(Q) - index - T) % Q, axis=1)
    return y_BTG + bias_G.astype(y_BTG.dtype), new_queue


class Block(nn.Module):
  """One dilated causal conv, its activation, and the 1x1 layers into the residual stream and
  the skip sum: [x, skip] -> [x + residual(a), skip + skip(a)] ([B, T, C + S]), and the
  conv's new queue."""

  config: Config
  deterministic: bool = True  # no dropout here; kept for the stack

  @nn.compact
  def __call__(self, x_BTX, queue_BQC, ctx):
    cfg = self.config
    p = cfg.policy
    C, S = cfg.channels, cfg.skip_channels
    x_BTC, skip_BTS = x_BTX[..., :C], x_BTX[..., C:]
    layer = ctx['layer']
    queue_len = cfg.queue_len(layer if isinstance(layer, int) else None)
    gates = 2 if cfg.gated else 1
    z_BTG, queue = CausalConv1D(
      gates * C, cfg.kernel_size, cfg.dilation(layer), queue_len, p, name='conv'
    )(x_BTC, queue_BQC, ctx.get('index'), ctx.get('positions'))
    if cfg.gated:  # channel c's filter and gate are outputs 2c and 2c + 1 (see RULES)
      z_BTC2 = z_BTG.reshape(*z_BTG.shape[:-1], C, 2)
      a_BTC = jnp.tanh(z_BTC2[..., 0]) * jax.nn.sigmoid(z_BTC2[..., 1])
    else:
      a_BTC = jax.nn.relu(z_BTG)
    # Every layer adds to the residual stream and to the skip sum: 1/sqrt(layers) keeps their
    # variance at initialisation independent of depth (as GPT-2 scales its residual branches).
    std = (C * len(cfg.dilations)) ** -0.5
    dense = lambda n, names, name: layers.Dense((n,), names, init_std=std, policy=p, name=name)
    x_BTC = x_BTC + dense(C, ('conv_channels', 'conv_in'), 'residual')(a_BTC).astype(jnp.float32)
    if S:
      skip_BTS = skip_BTS + dense(S, ('conv_channels', 'conv_skip'), 'skip')(a_BTC).astype(
        jnp.float32
      )
      x_BTC = jnp.concatenate([x_BTC, skip_BTS], axis=-1)
    return nn.with_logical_constraint(x_BTC, ('batch', 'length', 'conv_in')), queue

  @staticmethod
  def layer_cache(cfg: Config, batch_size: int, max_len: int, layer: int | None):
    """An empty queue (zeros, the causal padding), its size set by the dilation alone."""
    del max_len
    return jnp.zeros((batch_size, cfg.queue_len(layer), cfg.channels), cfg.policy.compute)


class Model(nn.Module):
  """Embedding -> dilated causal conv layers (residual, skip) -> ReLU 1x1 head -> logits."""

  config: Config
  deterministic: bool = True  # no dropout here; kept for the contract

  def setup(self):
    cfg = self.config
    S = cfg.skip_channels
    self.token_embed = layers.token_embedding(cfg.vocab_size, cfg.channels, stddev=1.0)
    names = ('batch', 'length', 'conv_in')
    self.stack = stack.Stack(Block, cfg, len(cfg.dilations), self.deterministic, names)
    self.head_hidden = layers.Dense(
      (cfg.head_channels,),
      ('conv_skip', 'mlp'),
      init_std=(S or cfg.channels) ** -0.5,
      policy=cfg.policy,
    )
    self.head = layers.Dense(
      (cfg.vocab_size,), ('mlp', 'vocab'), init_std=cfg.head_channels**-0.5, policy=cfg.policy
    )

  def embed(self, tokens_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    del segment_ids_BT  # a token's embedding does not depend on its document
    return self.token_embed(tokens_BT).astype(jnp.float32)

  def _forward(self, tokens_BT, queues, index, x_BTC=None, positions_BT=None):
    cfg = self.config
    x_BTC = self.embed(tokens_BT) if x_BTC is None else x_BTC
    skip_BTS = jnp.zeros((*x_BTC.shape[:2], cfg.skip_channels), x_BTC.dtype)
    ctx = {'index': index} if positions_BT is None else {'positions': positions_BT}
    x_BTX, new_queues = self.stack(jnp.concatenate([x_BTC, skip_BTS], axis=-1), queues, ctx)
    out_BTS = x_BTX[..., cfg.channels :] if cfg.skip_channels else x_BTX
    h_BTF = jax.nn.relu(self.head_hidden(jax.nn.relu(out_BTS)))
    return self.head(h_BTF).astype(jnp.float32), new_queues

  def __call__(
    self,
    tokens_BT: jax.Array,
    embeddings_BTC: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
  ) -> jax.Array:
    """Teacher forcing: logits_BTV, position t seeing tokens t - receptive_field + 1 .. t (of
    its own document, given segment_ids_BT)."""
    positions_BT = None if segment_ids_BT is None else layers.segment_positions(segment_ids_BT)
    return self._forward(tokens_BT, None, None, embeddings_BTC, positions_BT)[0]

  def step(self, tokens_BT: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """T new tokens (a prefill, or one: Fast WaveNet) after the queues in `cache`."""
    T = tokens_BT.shape[1]
    logits_BTV, queues = self._forward(tokens_BT, cache['queues'], cache['index'])
    return logits_BTV, {'index': cache['index'] + T, 'queues': queues}

  def init_cache(self, batch_size: int, max_len: int = 0) -> dict:
    """Empty queues; their size is set by the dilations alone."""
    cfg = self.config
    queues = stack.init_cache(Block, cfg, len(cfg.dilations), batch_size, max_len)
    return {'index': jnp.array(0, jnp.int32), 'queues': queues}

  @property
  def cache_batch_axis(self) -> int:
    return stack.cache_batch_axis(self.config)

  max_len = 0  # no positions: any length (context = the receptive field)
  sequential = False

  @property
  def receptive_field(self) -> int:
    return self.config.receptive_field

  def flops_per_token(self, seq_len: int) -> float:
    """Forward matmul FLOPs per token: the convs' K taps, the 1x1 layers and the head."""
    del seq_len
    cfg = self.config
    C, S, F = cfg.channels, cfg.skip_channels, cfg.head_channels
    G = 2 * C if cfg.gated else C
    per_layer = 2 * cfg.kernel_size * C * G + 2 * C * C + 2 * C * S
    return float(len(cfg.dilations) * per_layer + 2 * (S or C) * F + 2 * F * cfg.vocab_size)
