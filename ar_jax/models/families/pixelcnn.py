"""PixelCNN (van den Oord et al. 2016): masked convolutions over an image in raster order.

Under the model contract an image is the token sequence [BOS, x_1 .. x_N], its N = H * W * C
sub-pixels in raster order (row by row, each pixel's channels in turn). The model un-shifts
its input (drops BOS, pads the end) into an image, so the logits at position t, which predict
sub-pixel t + 1, come out at that sub-pixel's place in the image, and masks keep them from
seeing it or anything after it. Each sub-pixel gets a softmax over its `levels` values
(256 for 8-bit images, 2 for binarized ones: a Bernoulli); the BOS logit is -inf.

Masks (van den Oord et al. 2016, "Pixel Recurrent Neural Networks"): type A (first layer)
hides the current pixel, type B (later layers) shows it. With C > 1 channels the features
are split into C groups, group c predicting channel c, and the current pixel's tap connects
group c to input groups < c (A) or <= c (B).

The plain PixelCNN stacks k x k masked convolutions, whose receptive field has a blind spot
above and to the right. The gated PixelCNN (van den Oord et al. 2016, "Conditional Image
Generation with PixelCNN Decoders") has none: a vertical stack sees every row above, a
horizontal stack the current row to the left, and the vertical feeds the horizontal.

The first layer (mask A, the image's C channels in) stands alone; the num_layers after it
(mask B) are the shared stack's blocks, the gated ones carrying both stacks side by side
([B, H, W, 2F]: vertical, then horizontal).

Dimension legend: B batch, T time, N sub-pixels, H height, W width, C image channels,
F features, L levels, V vocab (L + BOS), I/O conv input/output features.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ar_jax.errors import check
from ar_jax.models import contract, layers, numerics, stack

# FSDP splits each convolution's input features, or its output features where the input
# does not divide (the first layer reads C = 1 or 3 image channels). No tensor rule: a
# gated layer's filter and gate halves and the masks' channel groups are contiguous blocks
# of the features, which a split over tensor would cut across.
RULES = (
  ('conv_in', 'fsdp'),
  ('conv_channels', 'fsdp'),
)
_TINY = dict(image_height=4, image_width=4, num_layers=2, features=32, head_features=32)
TINY = {
  'gated': dict(_TINY, first_kernel_size=3),
  'plain': dict(_TINY, gated=False, first_kernel_size=3),
  'rgb': dict(_TINY, image_height=3, image_width=3, image_channels=3, features=24),
}
# Rows are whole images (BOS and their sub-pixels): no packed documents.
CAPABILITIES = contract.Capabilities(width=('features',), packs_documents=False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config(stack.StackConfig, numerics.NumericsConfig):  # dtype: the convolutions'
  vocab_size: int  # decided by the tokenizer: the levels of a sub-pixel, and BOS
  image_height: int = 8
  image_width: int = 8
  image_channels: int = 1  # C: 1 for grey, 3 for RGB (predicted in that order)
  gated: bool = True  # gated vertical + horizontal stacks (no blind spot), else plain
  num_layers: int = 6  # layers after the first (mask A) one
  features: int = 64  # F, per stack; divisible by image_channels
  kernel_size: int = 3  # k x k of the later layers (odd)
  first_kernel_size: int = 7  # k x k of the first layer (odd)
  head_features: int = 128  # the hidden 1x1 layer of the output head

  def __post_init__(self):
    for name in ('image_height', 'image_width', 'image_channels', 'num_layers', 'head_features'):
      check(getattr(self, name) > 0, f'model.{name} must be positive, got {getattr(self, name)}')
    check(
      self.vocab_size >= 3,
      f'vocab_size={self.vocab_size}: a PixelCNN needs at least 2 levels and BOS',
    )
    check(
      self.features > 0 and self.features % self.image_channels == 0,
      f'model.features={self.features} must be a positive multiple of '
      f'model.image_channels={self.image_channels} (one feature group per channel)',
    )
    for name in ('kernel_size', 'first_kernel_size'):
      size = getattr(self, name)
      check(size > 0 and size % 2 == 1, f'model.{name} must be odd and positive, got {size}')
    self.check_numerics()
    self.check_stack(self.num_layers)

  @property
  def levels(self) -> int:
    return self.vocab_size - 1

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return self.image_height, self.image_width, self.image_channels

  @property
  def num_subpixels(self) -> int:
    return math.prod(self.image_shape)


def groups(n: int, channels: int) -> np.ndarray:
  """The channel group of each of n features: contiguous blocks, group c predicting channel c."""
  return np.arange(n) * channels // n


def mask(
  kernel_hw: tuple[int, int],
  in_groups_I: np.ndarray,
  out_groups_O: np.ndarray,
  mask_type: str,
  centre: tuple[int, int] | None = None,
) -> np.ndarray:
  """The mask, [kh, kw, I, O]: rows below the centre and the centre row after the
  centre are zero; the centre tap itself is zero (A) or one (B) for a single channel, and
  with channel groups connects output group g to input groups < g (A) or <= g (B)."""
  check(mask_type in ('A', 'B'), f"mask type must be 'A' or 'B', got {mask_type!r}")
  kh, kw = kernel_hw
  ch, cw = centre or (kh // 2, kw // 2)
  m = np.ones((kh, kw, len(in_groups_I), len(out_groups_O)), np.float32)
  m[ch + 1 :] = 0.0
  m[ch, cw + 1 :] = 0.0
  if mask_type == 'A':
    m[ch, cw] = out_groups_O[None, :] > in_groups_I[:, None]
  else:
    m[ch, cw] = out_groups_O[None, :] >= in_groups_I[:, None]
  return m


class Conv2D(nn.Module):
  """A 2-D convolution with explicit padding and an optional fixed mask on its kernel."""

  features: int
  kernel_hw: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  mask: np.ndarray | None = None  # [kh, kw, I, O], applied to the kernel on every call
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWI):
    kernel = self.param(
      'kernel',
      layers.partitioned(
        nn.initializers.lecun_normal(), ('conv_height', 'conv_width', 'conv_in', 'conv_channels')
      ),
      (*self.kernel_hw, x_BHWI.shape[-1], self.features),
    )
    if self.mask is not None:
      kernel = kernel * self.mask
    bias = self.param('bias', layers.zeros_init(('conv_channels',)), (self.features,))
    y_BHWO = jax.lax.conv_general_dilated(
      x_BHWI.astype(self.dtype),
      kernel.astype(self.dtype),
      window_strides=(1, 1),
      padding=self.padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    return y_BHWO + bias.astype(self.dtype)


def _masked(features, k, in_groups, out_groups, mask_type, dtype, name):
  """A k x k masked convolution ('same' size output)."""
  return Conv2D(
    features,
    (k, k),
    ((k // 2, k // 2), (k // 2, k // 2)),
    mask((k, k), in_groups, out_groups, mask_type),
    dtype,
    name=name,
  )


def _gate(z_BHW2F):
  filter_BHWF, gate_BHWF = jnp.split(z_BHW2F, 2, axis=-1)
  return jnp.tanh(filter_BHWF) * jax.nn.sigmoid(gate_BHWF)


class GatedLayer(nn.Module):
  """One layer of both stacks. The vertical stack at row h sees image rows < h only; the
  horizontal stack at (h, w) sees the row to the left (and, after the first layer, its own
  current pixel, which by then holds nothing of the pixel's ungenerated sub-pixels).

  Vertical: a (k//2 + 1) x k kernel over rows h - k//2 .. h of its input; the first layer
  shifts the image down one row first, so 'rows <= h of the input' is 'rows < h'.
  Horizontal: a 1 x (k//2 + 1) kernel over columns w - k//2 .. w, masked at w (A or B).
  """

  features: int
  kernel_size: int
  channels: int
  first: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, v_BHWI, h_BHWI):
    F, k, C = self.features, self.kernel_size, self.channels
    half = k // 2
    in_groups = groups(h_BHWI.shape[-1], C)
    gated_groups = np.concatenate([groups(F, C), groups(F, C)])  # filter and gate halves alike
    if self.first:
      v_BHWI = jnp.pad(v_BHWI, ((0, 0), (1, 0), (0, 0), (0, 0)))[:, :-1]
    v_BHW2F = Conv2D(2 * F, (half + 1, k), ((half, 0), (half, half)), None, self.dtype, name='v')(
      v_BHWI
    )
    h_mask = mask((1, half + 1), in_groups, gated_groups, 'A' if self.first else 'B', (0, half))
    h_BHW2F = Conv2D(2 * F, (1, half + 1), ((0, 0), (half, 0)), h_mask, self.dtype, name='h')(
      h_BHWI
    )
    # The vertical features at (h, w) come from rows above only: any group may read them.
    link = Conv2D(2 * F, (1, 1), ((0, 0), (0, 0)), None, self.dtype, name='v_to_h')
    h_BHW2F = h_BHW2F + link(v_BHW2F)
    out_mask = mask((1, 1), groups(F, C), groups(F, C), 'B')
    h_out = Conv2D(F, (1, 1), ((0, 0), (0, 0)), out_mask, self.dtype, name='h_out')(_gate(h_BHW2F))
    # No residual around the first layer: its input is the image, and its output the first
    # features that may not see the current sub-pixel.
    return _gate(v_BHW2F), h_out if self.first else h_BHWI + h_out


class Block(nn.Module):
  """A layer after the first: gated (both stacks, [B, H, W, 2F] in and out) or plain (h +
  conv(ReLU(h))). No cache: decoding recomputes the image (see Model.step)."""

  config: Config
  deterministic: bool = True  # no dropout here; kept for the stack

  @nn.compact
  def __call__(self, x_BHWX, cache, ctx):
    del ctx
    cfg = self.config
    F, C, k = cfg.features, cfg.image_channels, cfg.kernel_size
    dtype = cfg.policy.compute
    if cfg.gated:
      v_BHWF, h_BHWF = jnp.split(x_BHWX, 2, axis=-1)
      v_BHWF, h_BHWF = GatedLayer(F, k, C, False, dtype, name='gated')(v_BHWF, h_BHWF)
      x_BHWX = jnp.concatenate([v_BHWF, h_BHWF], axis=-1)
    else:
      conv = _masked(F, k, groups(F, C), groups(F, C), 'B', dtype, 'conv')
      x_BHWX = x_BHWX + conv(jax.nn.relu(x_BHWX))
    return nn.with_logical_constraint(x_BHWX, ('batch', None, None, 'conv_channels')), cache

  @staticmethod
  def layer_cache(cfg: Config, batch_size: int, max_len: int, layer: int | None) -> None:
    del cfg, batch_size, max_len, layer


def _check_whole_images(segment_ids_BT) -> None:
  check(
    segment_ids_BT is None,
    'packed documents (segment_ids) apply to the text families; a PixelCNN reads whole '
    "images, with data.sampling='examples'",
  )


class Model(nn.Module):
  """Un-shift the tokens into an image, masked convolutions, a per-sub-pixel softmax."""

  config: Config
  deterministic: bool = True  # no dropout here; kept for the contract

  def setup(self):
    cfg = self.config
    dtype = cfg.policy.compute
    F, C, L = cfg.features, cfg.image_channels, cfg.levels
    if cfg.gated:
      self.first = GatedLayer(F, cfg.first_kernel_size, C, True, dtype, name='first')
    else:
      self.first = _masked(
        F, cfg.first_kernel_size, groups(C, C), groups(F, C), 'A', dtype, 'first'
      )
    names = ('batch', None, None, 'conv_channels')
    self.stack = stack.Stack(Block, cfg, cfg.num_layers, self.deterministic, names)
    head_groups = groups(cfg.head_features, C)
    self.head_hidden = Conv2D(
      cfg.head_features,
      (1, 1),
      ((0, 0), (0, 0)),
      mask((1, 1), groups(F, C), head_groups, 'B'),
      dtype,
    )
    self.head = Conv2D(
      C * L, (1, 1), ((0, 0), (0, 0)), mask((1, 1), head_groups, groups(C * L, C), 'B'), dtype
    )

  def embed(self, tokens_BT: jax.Array, segment_ids_BT: jax.Array | None = None) -> jax.Array:
    """Each sub-pixel's value scaled to [-1, 1], [B, T, 1] (BOS too; __call__ drops it)."""
    _check_whole_images(segment_ids_BT)
    return (tokens_BT.astype(jnp.float32) * (2.0 / (self.config.levels - 1)) - 1.0)[..., None]

  def __call__(
    self,
    tokens_BT: jax.Array,
    embeddings_BT1: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
  ) -> jax.Array:
    """Teacher forcing on [BOS, x_1 .. x_{T-1}]: logits_BTV for x_1 .. x_T.

    T may be N + 1 (a whole image and BOS, as decoding holds it); the last position, past the
    image, predicts nothing and gets uniform logits. Rows are whole images: no segment_ids_BT.
    """
    _check_whole_images(segment_ids_BT)
    cfg = self.config
    B, T = tokens_BT.shape
    N, L = cfg.num_subpixels, cfg.levels
    check(
      T <= N + 1,
      f'sequence length {T} exceeds BOS + the {N} sub-pixels of a '
      f'{"x".join(map(str, cfg.image_shape))} image',
    )
    x_BT1 = self.embed(tokens_BT) if embeddings_BT1 is None else embeddings_BT1
    # Un-shifted: BOS dropped, the sub-pixels not given yet zero (no mask lets them through).
    x_BN = jnp.pad(x_BT1[:, 1:, 0], ((0, 0), (0, N + 1 - T)))
    x_BHWC = x_BN.reshape(B, *cfg.image_shape)
    if cfg.gated:
      x_BHWX = jnp.concatenate(self.first(x_BHWC, x_BHWC), axis=-1)
      h_BHWF = jnp.split(self.stack(x_BHWX)[0], 2, axis=-1)[1]
    else:
      h_BHWF = self.stack(self.first(x_BHWC))[0]
    out_BHWX = self.head(jax.nn.relu(self.head_hidden(jax.nn.relu(h_BHWF))))
    logits_BNL = out_BHWX.astype(jnp.float32).reshape(B, N, L)
    # BOS is never a sub-pixel: -inf keeps the softmax over the L levels alone.
    logits_BNV = jnp.pad(logits_BNL, ((0, 0), (0, 1), (0, 1)))
    logits_BNV = logits_BNV.at[:, :, L].set(-jnp.inf)
    return logits_BNV[:, :T]

  def step(self, tokens_BT: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
    """Writes the T new tokens into the cached sequence and recomputes the whole image: a
    masked conv stack has no cheap incremental state, and the image is small."""
    T = tokens_BT.shape[1]
    seq_BS = jax.lax.dynamic_update_slice_in_dim(cache['tokens'], tokens_BT, cache['index'], 1)
    logits_BSV = self(seq_BS)
    logits_BTV = jax.lax.dynamic_slice_in_dim(logits_BSV, cache['index'], T, axis=1)
    return logits_BTV, {'index': cache['index'] + T, 'tokens': seq_BS}

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    check(max_len <= self.max_len, f'{max_len} positions exceed the image: {self.max_len}')
    return {
      'index': jnp.array(0, jnp.int32),
      'tokens': jnp.zeros((batch_size, max_len), jnp.int32),
    }

  @property
  def max_len(self) -> int:
    """BOS and the N sub-pixels: decoding holds a whole image, though it reads only N."""
    return self.config.num_subpixels + 1

  cache_batch_axis = 0  # the cache is the image so far, [B, N + 1]
  sequential = False

  def flops_per_token(self, seq_len: int) -> float:
    """Forward FLOPs per token. The forward computes the whole image however few of its
    sub-pixels are given; a convolution's taps count where they fall inside the image (as
    XLA counts them), masked ones too (they are multiplied)."""
    cfg = self.config
    F, C, L, X = cfg.features, cfg.image_channels, cfg.levels, cfg.head_features
    H, W = cfg.image_height, cfg.image_width

    def taps(rows: tuple[int, int], cols: tuple[int, int]) -> int:
      """Kernel taps inside the image, summed over all pixels, for row offsets rows[0] ..
      rows[1] and column offsets cols[0] .. cols[1]."""
      inside = lambda lo, hi, n: sum(min(hi, n - 1 - i) - max(lo, -i) + 1 for i in range(n))
      return inside(*rows, H) * inside(*cols, W)

    pixels = H * W
    total = 2 * F * X * pixels + 2 * X * C * L * pixels  # the 1 x 1 head
    for i in range(cfg.num_layers + 1):
      k, d_in = (cfg.first_kernel_size, C) if i == 0 else (cfg.kernel_size, F)
      half = k // 2
      if cfg.gated:  # vertical, horizontal, vertical-to-horizontal and output convolutions
        total += 2 * d_in * 2 * F * (taps((-half, 0), (-half, half)) + taps((0, 0), (-half, 0)))
        total += 2 * (2 * F) ** 2 * pixels + 2 * F * F * pixels
      else:
        total += 2 * d_in * F * taps((-half, half), (-half, half))
    return float(total / seq_len)
