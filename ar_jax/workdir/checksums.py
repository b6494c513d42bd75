"""Checksums of a checkpoint's arrays, recorded when it is saved and verified when it is
restored: tensorstore reads raw array chunks without checking them, so a byte changed on disk
would otherwise restore as a wrong value."""

import hashlib
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def _words(x: jax.Array) -> jax.Array:
  """x's bits as uint32 words (16- and 8-bit types widened, 64-bit split in two)."""
  size = x.dtype.itemsize
  if size == 8:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)
  unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[size]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


def _checksum(x: jax.Array) -> jax.Array:
  """sum_i w_i x_i mod 2^32 over x's words, w_i odd and varying with the position i: a flipped
  bit always changes it. Integer sums are exact in any order, so a sharded array sums to the
  same value on any mesh; the position comes from iotas along each axis, not a reshape, so
  XLA reads each shard where it lies."""
  words = _words(x)
  index = jnp.zeros(words.shape, jnp.uint32)
  for axis in range(words.ndim):
    stride = math.prod(words.shape[axis + 1 :]) % 2**32
    index = index + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis) * jnp.uint32(stride)
  weights = index * jnp.uint32(2654435761) + jnp.uint32(1)  # Knuth's multiplier; odd
  return jnp.sum(words * weights, dtype=jnp.uint32)


_checksums_jitted = jax.jit(lambda tree: jax.tree.map(_checksum, tree))


def of(state: Any) -> dict[str, int]:
  """{'params/...': checksum} of every array of the state, computed where the arrays lie."""
  flat = ocp.tree.to_flat_dict(state, sep='/')
  return {k: int(v) for k, v in jax.device_get(_checksums_jitted(flat)).items()}


def of_json(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
