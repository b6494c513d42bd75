"""The train state: what a checkpoint holds of a run's arrays, built from shapes first."""

import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ar_jax import models
from ar_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Stateful (truncated-BPTT) training: the model's cache after the last batch, the initial
  # state of the next one. None otherwise.
  carry: Any = None


def init_fn(model, tx, config: ml_collections.ConfigDict, unbox: bool):
  dummy = jnp.zeros((1, min(config.data.seq_len, 8)), jnp.int32)

  def init(rng):
    params = model.init(rng, dummy)['params']
    params = nn.unbox(params) if unbox else params
    carry = model.init_cache(config.batch_size, config.data.seq_len) if config.stateful else None
    return TrainState(jnp.array(0, jnp.int32), params, tx.init(params), carry)

  return init


def abstract_state(
  model: nn.Module, tx, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict
) -> tuple[TrainState, TrainState]:
  """(shape-only state carrying its shardings, the shardings), materialising nothing."""
  boxed = jax.eval_shape(init_fn(model, tx, config, unbox=False), jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, models.sharding_rules(config))
  if config.stateful:  # the carry's rows follow the batch's
    by_batch = sharding.batch_sharding(mesh, leading_dims=model.cache_batch_axis)
    shardings = shardings.replace(
      carry=jax.tree.map(lambda x: by_batch if x.ndim else sharding.replicated(mesh), boxed.carry)
    )
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return abstract, shardings


def count_params(params: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
