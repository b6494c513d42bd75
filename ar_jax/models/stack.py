"""One layer stack for every family: L identical blocks, unrolled or scanned, rematerialised,
split over pipeline stages in teacher forcing, with a stacked cache for decoding.

A family's block is a Flax module Block(config, deterministic) called as

  (x, layer_cache, ctx) -> (x, layer_cache)

x is the activations, [B, T, ...] (or time-major [T, B, ...], batch_axis=1); layer_cache the
layer's decoding state (None in teacher forcing); ctx a dict of what every layer reads alike:
'positions', 'segment_ids', 'keep' (False where a document starts), as a family needs them,
each batch-leading [B, ...], and 'layer', the block's index in the stack: a Python int when
unrolled, a traced int32 when scanned or pipelined (a block whose layers differ, as WaveNet's
dilations, computes the difference from it). Block.layer_cache(config, batch_size, max_len,
layer) is one layer's empty cache, layer None for a scanned stack (every layer alike).

The family's Config carries the stack's settings (StackConfig). The blocks' parameters sit in
the family's own tree (block_0 .. block_{L-1}, or 'blocks' with a leading 'layers' axis when
scanned), as if the family had made them itself.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ar_jax.errors import check
from ar_jax.models import layers
from ar_jax.parallel import pipeline as pipeline_lib


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackConfig:
  """The stack's fields of a family's Config (which inherits them)."""

  # One scanned block with a leading 'layers' parameter axis: the stack compiles once, not
  # L times, and pipeline stages split it.
  scan_layers: bool = False
  remat: str = 'none'  # what a block keeps for the backward pass: see layers.REMAT_POLICIES
  # Pipeline stages (ar_jax/pipeline.py) of teacher forcing, set by the run from mesh.stage:
  # never a config.model field. None: one stage.
  pipeline: pipeline_lib.Pipeline | None = None

  def check_stack(self, length: int) -> None:
    layers.check_remat(self.remat)
    if self.pipeline is not None:
      check(self.scan_layers, 'pipeline stages split a scanned stack: set model.scan_layers=True')
      self.pipeline.check_layers(length)


def _indexed(block: type[nn.Module]) -> type[nn.Module]:
  """The block, told its index: a field when unrolled (a static int), an argument when
  scanned (its slice of arange(L))."""

  class Indexed(block):
    layer: int | None = None

    def __call__(self, x, cache, ctx, layer=None):
      return super().__call__(
        x, cache, {**ctx, 'layer': layer if self.layer is None else self.layer}
      )

  Indexed.__name__ = Indexed.__qualname__ = block.__name__
  return Indexed


class Stack(nn.Module):
  """`length` blocks of class `block`, each built as block(config, deterministic)."""

  block: Any
  config: Any  # the family's Config: a StackConfig
  length: int
  deterministic: bool = True
  names: tuple[str | None, ...] = ('batch', 'length', 'embed')  # x's logical axes
  batch_axis: int = 0  # x's batch axis: 0, or 1 for a time-major family

  def setup(self):
    nn.share_scope(self.parent, self)  # the blocks' parameters sit in the family's tree
    cfg = self.config
    cfg.check_stack(self.length)
    block = layers.remat(_indexed(self.block), cfg.remat, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.blocks = nn.scan(
        block,
        variable_axes={'params': 0},
        split_rngs={'params': True, 'dropout': True},
        in_axes=(0, nn.broadcast, 0),
        length=self.length,
        metadata_params={nn.PARTITION_NAME: 'layers'},
      )(cfg, self.deterministic, name='blocks')
    else:
      self.blocks = [
        block(cfg, self.deterministic, layer=i, name=f'block_{i}') for i in range(self.length)
      ]

  def __call__(self, x, caches=None, ctx=None):
    """(x after every block, their new caches: stacked [L, ...] when scanned, else a tuple;
    None in teacher forcing)."""
    ctx = ctx or {}
    if caches is None and self.config.pipeline is not None and not self.is_initializing():
      return self._pipelined(x, ctx), None
    if self.config.scan_layers:
      return self.blocks(x, caches, ctx, jnp.arange(self.length))
    new = []
    for i, block in enumerate(self.blocks):
      x, cache = block(x, None if caches is None else caches[i], ctx)
      new.append(cache)
    return x, None if caches is None else tuple(new)

  def _pipelined(self, x, ctx):
    """The scanned blocks run through the pipeline's schedule (teacher forcing only)."""
    cfg = self.config
    if self.batch_axis:
      x = jnp.swapaxes(x, 0, self.batch_axis)
    block = _indexed(self.block)

    def layer(params, x_b, ctx_b, key, index):
      if self.batch_axis:
        x_b = jnp.swapaxes(x_b, 0, self.batch_axis)
      out = block(cfg, self.deterministic, parent=None).apply(
        {'params': params}, x_b, None, ctx_b, index, rngs={} if key is None else {'dropout': key}
      )[0]
      return jnp.swapaxes(out, 0, self.batch_axis) if self.batch_axis else out

    key = None if self.deterministic else self.make_rng('dropout')
    names = list(self.names)
    names.insert(0, names.pop(self.batch_axis))
    params = self.variables['params']['blocks']
    x = pipeline_lib.apply(layer, params, x, ctx, cfg.pipeline, tuple(names), key)
    return jnp.swapaxes(x, 0, self.batch_axis) if self.batch_axis else x


def init_cache(block, config, length: int, batch_size: int, max_len: int) -> Any:
  """The empty caches of a stack of `length` blocks (Block.layer_cache each): stacked on a
  leading layer axis when scanned, else a tuple."""
  if config.scan_layers:
    one = block.layer_cache(config, batch_size, max_len, None)
    return jax.tree.map(lambda a: jnp.stack([a] * length), one)
  return tuple(block.layer_cache(config, batch_size, max_len, i) for i in range(length))


def cache_batch_axis(config) -> int:
  """The batch axis of a stack's cache arrays: the layers come first when scanned."""
  return int(config.scan_layers)
