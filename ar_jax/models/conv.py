"""Causal convolutional language models: a plain causal-conv stack and WaveNet.

A causal convolution pads the past with k - 1 zeros (k taps), so output t sees inputs <= t.
WaveNet (van den Oord et al. 2016) stacks dilated causal convolutions, dilations
1, 2, ..., 2^(n-1) repeated in blocks, with the gated activation tanh(W_f * x) * sigmoid(W_g * x),
residual connections around every layer and skip connections summed into the output.
The plain causal-conv LM is the same stack with dilation 1, ReLU and no skip path.

Cached decoding is Fast WaveNet (Paine et al. 2016): every layer keeps a queue of the last
(kernel_size - 1) * dilation inputs it saw, so a new token costs O(layers) matmuls however
large the receptive field. The queue is a ring buffer: position p lives in slot p mod Q.

Dimension legend: B batch, T time, C residual channels, G conv outputs (2C gated, C plain),
S skip channels, V vocab, K kernel taps, Q queue length of a layer.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax import decoding
from ar_jax.errors import check
from ar_jax.models import layers


@dataclasses.dataclass(frozen=True)
class Config:
  vocab_size: int  # decided by the tokenizer
  channels: int = 64  # residual channels C (the embedding width too)
  kernel_size: int = 2  # taps of every causal conv; WaveNet uses 2
  layers_per_block: int = 10  # dilations dilation_base^0 .. dilation_base^(layers_per_block-1)
  num_blocks: int = 1  # repeats of the dilation cycle
  dilation_base: int = 2  # 2: WaveNet's doubling dilations; 1: a plain causal-conv stack
  gated: bool = True  # tanh(W_f * x) * sigmoid(W_g * x) (WaveNet), else ReLU(W * x)
  skip_channels: int = 128  # S: width of the summed skip connections; 0 = head reads the stack
  head_channels: int = 128  # width of the output head's hidden 1x1 layer
  dtype: str = 'float32'  # compute dtype of convs and 1x1 layers; logits stay float32

  def __post_init__(self):
    for name in ('vocab_size', 'channels', 'layers_per_block', 'num_blocks', 'head_channels'):
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}')
    check(
      self.kernel_size >= 2,
      f'model.kernel_size must be >= 2 (1 sees no past), got {self.kernel_size}',
    )
    check(self.dilation_base >= 1, f'model.dilation_base must be >= 1, got {self.dilation_base}')
    check(self.skip_channels >= 0, f'model.skip_channels must be >= 0, got {self.skip_channels}')
    check(
      self.dtype in ('float32', 'bfloat16', 'float16'),
      f'model.dtype={self.dtype!r}; allowed: float32, bfloat16, float16',
    )

  @property
  def dilations(self) -> tuple[int, ...]:
    cycle = [self.dilation_base**i for i in range(self.layers_per_block)]
    return tuple(cycle * self.num_blocks)

  @property
  def receptive_field(self) -> int:
    """Tokens that reach one output: (kernel_size - 1) * sum(dilations) + 1. One block of
    kernel 2 and dilations 1 .. 2^(n-1) sees 2^n: 2^L for L layers."""
    return (self.kernel_size - 1) * sum(self.dilations) + 1


class CausalConv1D(nn.Module):
  """y_t = sum_k W_k x_{t - (K-1-k) d} + b, with x_t = 0 before the sequence (or the queue).

  Without a queue: the teacher-forced form, left-padding Q = (K-1) d zeros. With one
  ([B, Q, C] ring buffer holding positions index-Q .. index-1 in slots position mod Q):
  the T new inputs continue it, and the updated queue is returned.
  """

  features: int
  kernel_size: int
  dilation: int
  dtype: jnp.dtype = jnp.float32

  @property
  def queue_len(self) -> int:
    return (self.kernel_size - 1) * self.dilation

  @nn.compact
  def __call__(self, x_BTC, queue_BQC=None, index=None):
    K, Q, d = self.kernel_size, self.queue_len, self.dilation
    kernel_KCG = self.param(
      'kernel',
      layers.partitioned(
        nn.initializers.lecun_normal(), ('conv_width', 'conv_in', 'conv_channels')
      ),
      (K, x_BTC.shape[-1], self.features),
    ).astype(self.dtype)
    bias_G = self.param('bias', layers.zeros_init(('conv_channels',)), (self.features,))
    x_BTC = x_BTC.astype(self.dtype)
    T = x_BTC.shape[1]

    if queue_BQC is not None and T == 1:
      # Fast WaveNet: the K - 1 earlier taps are single slots of the ring, so a new token
      # reads K - 1 vectors and writes one, whatever the dilation.
      slots_K = (index - d * jnp.arange(K - 1, 0, -1)) % Q
      window_BKC = jnp.concatenate([jnp.take(queue_BQC, slots_K, axis=1), x_BTC], axis=1)
      y_BTG = jnp.einsum('bkc,kcg->bg', window_BKC, kernel_KCG)[:, None]
      new_queue = jax.lax.dynamic_update_slice_in_dim(queue_BQC, x_BTC, index % Q, axis=1)
      return y_BTG + bias_G.astype(self.dtype), new_queue

    if queue_BQC is None:
      history_BQC, new_queue = jnp.zeros((x_BTC.shape[0], Q, x_BTC.shape[-1]), self.dtype), None
    else:  # a prefill: the ring in time order, then the T new inputs
      history_BQC = jnp.take(queue_BQC, (index + jnp.arange(Q)) % Q, axis=1)
    seq_BLC = jnp.concatenate([history_BQC, x_BTC], axis=1)
    # Tap k reads x_{t - (K-1-k) d} = seq[t + k d]. The K shifted views side by side make the
    # conv one 2-D matmul [B*T, K*C] x [K*C, G]: on CPU several times faster to train than
    # lax.conv_general_dilated with rhs_dilation, whose gradients XLA:CPU lowers poorly.
    B, _, C = x_BTC.shape
    taps_BTKC = jnp.stack([seq_BLC[:, k * d : k * d + T] for k in range(K)], axis=2)
    y_BTG = (taps_BTKC.reshape(B * T, K * C) @ kernel_KCG.reshape(K * C, -1)).reshape(B, T, -1)
    if queue_BQC is not None:
      # The last Q inputs are positions index + T - Q .. index + T - 1; slot s holds the one
      # whose position is s mod Q.
      new_queue = jnp.take(seq_BLC[:, T:], (jnp.arange(Q) - index - T) % Q, axis=1)
    return y_BTG + bias_G.astype(self.dtype), new_queue


class Model(nn.Module):
  """Embedding -> dilated causal conv layers (residual, skip) -> ReLU 1x1 head -> logits."""

  config: Config
  deterministic: bool = True  # no dropout here; kept for the contract

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    C, S = cfg.channels, cfg.skip_channels
    self.embed = layers.token_embedding(cfg.vocab_size, C, stddev=1.0)
    self.convs = [
      CausalConv1D(2 * C if cfg.gated else C, cfg.kernel_size, d, dtype, name=f'conv_{i}')
      for i, d in enumerate(cfg.dilations)
    ]
    # Every layer adds to the residual stream and to the skip sum: 1/sqrt(layers) keeps their
    # variance at initialisation independent of depth (as GPT-2 scales its residual branches).
    std = (C * len(cfg.dilations)) ** -0.5
    dense = lambda n, names, name: layers.Dense((n,), names, init_std=std, dtype=dtype, name=name)
    self.residuals = [
      dense(C, ('conv_in', 'conv_channels'), f'residual_{i}') for i in range(len(cfg.dilations))
    ]
    if S:
      self.skips = [
        dense(S, ('conv_in', 'conv_skip'), f'skip_{i}') for i in range(len(cfg.dilations))
      ]
    self.head_hidden = layers.Dense(
      (cfg.head_channels,), ('conv_skip', 'mlp'), init_std=(S or C) ** -0.5, dtype=dtype
    )
    self.head = layers.Dense(
      (cfg.vocab_size,), ('mlp', 'vocab'), init_std=cfg.head_channels**-0.5, dtype=dtype
    )

  def _forward(self, tokens_BT, queues, index):
    cfg = self.config
    x_BTC = self.embed(tokens_BT).astype(jnp.float32)
    # A zero-valued hook: tests differentiate the logits with respect to the embeddings here.
    x_BTC = self.perturb('embeddings', x_BTC)
    skip_BTS = 0.0
    new_queues = []
    for i, conv in enumerate(self.convs):
      z_BTG, queue = conv(x_BTC, None if queues is None else queues[i], index)
      new_queues.append(queue)
      if cfg.gated:
        filter_BTC, gate_BTC = jnp.split(z_BTG, 2, axis=-1)
        a_BTC = jnp.tanh(filter_BTC) * jax.nn.sigmoid(gate_BTC)
      else:
        a_BTC = jax.nn.relu(z_BTG)
      x_BTC = x_BTC + self.residuals[i](a_BTC).astype(jnp.float32)
      x_BTC = nn.with_logical_constraint(x_BTC, ('batch', 'length', 'conv_channels'))
      if cfg.skip_channels:
        skip_BTS = skip_BTS + self.skips[i](a_BTC).astype(jnp.float32)
    out_BTS = skip_BTS if cfg.skip_channels else x_BTC
    h_BTF = jax.nn.relu(self.head_hidden(jax.nn.relu(out_BTS)))
    return self.head(h_BTF).astype(jnp.float32), new_queues

  def __call__(self, tokens_BT: jax.Array) -> jax.Array:
    """Teacher forcing: logits_BTV, position t seeing tokens t - receptive_field + 1 .. t."""
    return self._forward(tokens_BT, None, None)[0]

  def step(self, tokens_BT: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """T new tokens (a prefill, or one: Fast WaveNet) after the queues in `cache`."""
    T = tokens_BT.shape[1]
    logits_BTV, queues = self._forward(tokens_BT, cache['queues'], cache['index'])
    return logits_BTV, {'index': cache['index'] + T, 'queues': tuple(queues)}

  def init_cache(self, batch_size: int, max_len: int = 0) -> dict:
    """Empty queues (zeros, the causal padding); their size is set by the dilations alone."""
    del max_len
    cfg = self.config
    queues = tuple(
      jnp.zeros((batch_size, (cfg.kernel_size - 1) * d, cfg.channels), jnp.dtype(cfg.dtype))
      for d in cfg.dilations
    )
    return {'index': jnp.array(0, jnp.int32), 'queues': queues}

  max_len = 0  # no positions: any length (context = the receptive field)
  cache_batch_axis = 0

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


@functools.partial(jax.jit, static_argnames=('model', 'num_new', 'cached', 'temperature'))
def sample(
  model: Model,
  params,
  prompt_BP: jax.Array,
  rng: jax.Array,
  *,
  num_new: int,
  cached: bool,
  temperature: float = 1.0,
) -> jax.Array:
  """The prompt followed by num_new sampled tokens, [B, P + num_new]; the token at position t
  is drawn with the key fold_in(rng, t), so both ways of computing the logits draw alike.

  cached=True is Fast WaveNet: one prefill, then one cached step per token. cached=False is
  the naive way Fast WaveNet is measured and checked against: the full forward over the
  sequence buffer for every new token.
  """
  B, P = prompt_BP.shape
  tokens_BL = jnp.pad(prompt_BP.astype(jnp.int32), ((0, 0), (0, num_new)))

  def draw(t, logits_BV, tokens_BL):
    token_B = decoding.sample_token(logits_BV, jax.random.fold_in(rng, t), temperature, 0, 1.0)
    return tokens_BL.at[:, t].set(token_B)

  if not cached:

    def naive(t, tokens_BL):
      logits_BLV = model.apply({'params': params}, tokens_BL)
      return draw(t, jax.lax.dynamic_index_in_dim(logits_BLV, t - 1, 1, keepdims=False), tokens_BL)

    return jax.lax.fori_loop(P, P + num_new, naive, tokens_BL)

  step = functools.partial(model.apply, {'params': params}, method=model.step)
  logits_BPV, cache = step(prompt_BP, model.init_cache(B))
  tokens_BL = draw(P, logits_BPV[:, -1], tokens_BL)

  def fast(t, carry):
    tokens_BL, cache = carry
    logits_B1V, cache = step(jax.lax.dynamic_slice_in_dim(tokens_BL, t - 1, 1, axis=1), cache)
    return draw(t, logits_B1V[:, 0], tokens_BL), cache

  return jax.lax.fori_loop(P + 1, P + num_new, fast, (tokens_BL, cache))[0]
