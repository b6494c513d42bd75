"""Pipeline parallelism: a stack of L identical layers split over the mesh's 'stage' axis.

The layers' parameters are stacked, [L, ...], and their 'layers' axis is split over 'stage'
(sharding.SHARED_RULES): stage s of S holds layers s L/S .. (s + 1) L/S - 1, the same array
a run without stages holds whole, so a checkpoint restores under any stage count. A batch is
cut into M microbatches (row r in microbatch r % M, so each data shard keeps its share of
every one) that flow through the stages:

  GPipe (Huang et al. 2019): at tick t stage s runs microbatch t - s; M + S - 1 ticks, of
  which S - 1 leave each stage idle, the bubble (S - 1) / (M + S - 1). Its backward is the
  transpose of the same loop, so all forwards come before all backwards.
  Circular (interleaved; Narayanan et al. 2021): with R repeats the stack is cut into S R
  groups of L / (S R) layers, group v on stage v mod S, and each microbatch goes round the
  stages R times. A tick costs 1/R of a GPipe tick, and the bubble shrinks to
  (S - 1) / (M R + S - 1). Needs M >= S: a microbatch leaving the last stage waits in the
  loop buffer until stage 0 is free for it.

How: as MaxText does, in GSPMD rather than shard_map. The S stages' inputs are one array
[S, b, ...] whose leading axis is split over 'stage'; each tick vmaps the stage function over
it (with spmd_axis_name='stage', so every device computes its own stage's layers) and rolls
it by one, which XLA turns into a collective permute between neighbouring stages. The
layers' own sharding constraints keep working under the vmap, so data, fsdp and tensor
parallelism compose with the stages unchanged; a shard_map over 'stage' would make the layers
manual code on that axis and leave the others to a partially manual region.

The cost of keeping one parameter layout for every stage count: the circular schedule
regroups the blocked layers into [R, S, L / (S R)] inside the step, by collective permutes
that move (R - 1) / R of each stage's layer parameters (and their gradients back) every step,
and holds that copy beside the blocked one. A layout stored circular would avoid both and tie
checkpoints to R.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ar_jax.errors import ConfigError, check


@dataclasses.dataclass(frozen=True)
class Pipeline:
  stages: int = 1  # the mesh's 'stage' axis
  microbatches: int = 1
  repeats: int = 1  # virtual stages per device: 1 = GPipe, more = circular

  def __post_init__(self):
    for name in ('stages', 'microbatches', 'repeats'):
      check(getattr(self, name) > 0, f'pipeline {name} must be positive, got {self}')
    check(
      self.repeats == 1 or self.microbatches >= self.stages,
      f'the circular schedule (pipeline_repeats={self.repeats}) needs pipeline_microbatches '
      f'>= mesh.stage, got {self.microbatches} < {self.stages}',
    )

  @property
  def ticks(self) -> int:
    return self.microbatches * self.repeats + self.stages - 1

  @property
  def bubble(self) -> float:
    """The idle fraction of a step: (S - 1) / (M R + S - 1)."""
    return (self.stages - 1) / self.ticks

  def check_layers(self, num_layers: int) -> None:
    groups = self.stages * self.repeats
    check(
      num_layers % groups == 0,
      f'{num_layers} layers do not split into mesh.stage * pipeline_repeats = {groups} '
      'equal groups',
    )


def from_config(config: Any) -> Pipeline | None:
  """The run's pipeline (mesh.stage, pipeline_microbatches, pipeline_repeats), or None when
  it has one stage."""
  stages = int(config.mesh.get('stage', 1)) * int(config.mesh.get('dcn_stage', 1))
  if stages == 1:
    return None
  microbatches = config.get('pipeline_microbatches', 0) or stages
  return Pipeline(stages, microbatches, config.get('pipeline_repeats', 1))


def apply(
  layer_fn: Callable[..., jax.Array],
  params: Any,
  x: jax.Array,
  aux: Any,
  pipeline: Pipeline,
  names: Sequence[str | None],
  key: jax.Array | None = None,
) -> jax.Array:
  """The stack of layers applied to x [B, ...] through the pipeline's schedule.

  layer_fn(layer_params, x_b, aux_b, key_b, layer) applies layer `layer` (a traced index) to
  one microbatch x_b [B / M, ...]: layer_params are params' leaves [L, ...] at that layer,
  aux_b the microbatch's rows of `aux` (a tree of [B, ...] arrays: positions, segment ids),
  key_b None without `key`, else `key` folded with the microbatch and the layer (dropout).
  names: x's logical axis names.
  """
  S, M, R = pipeline.stages, pipeline.microbatches, pipeline.repeats
  L = jax.tree.leaves(params)[0].shape[0]
  pipeline.check_layers(L)
  per = L // (S * R)
  B = x.shape[0]
  if B % M:
    raise ConfigError(f'a batch of {B} rows does not split into {M} pipeline microbatches')
  # Group v = r S + s holds layers v per .. (v + 1) per - 1.
  grouped = jax.tree.map(lambda w: _circular(w, S, R), params)
  split = lambda a: jnp.swapaxes(a.reshape(B // M, M, *a.shape[1:]), 0, 1)  # [M, B / M, ...]
  constrain = lambda a, lead: nn.with_logical_constraint(a, (lead, *names))
  loop = constrain(split(x), None)  # stage 0's next inputs; at the end, the outputs
  aux = jax.tree.map(split, aux)
  stage_ids = jnp.arange(S)

  def run_stage(w, x_b, aux_b, m, r, s):  # the group of `per` layers from layer (r S + s) per
    def layer(x_b, inputs):
      w_layer, i = inputs
      key_b = None if key is None else jax.random.fold_in(jax.random.fold_in(key, m), i)
      return layer_fn(w_layer, x_b, aux_b, key_b, i), None

    # Unrolled: a loop inside the vmapped stage made the whole step slower on a CPU
    # (bench/pipeline.py; docs/benchmarks.md). A stage holds L / S layers, so this compiles
    # each of them once per stage rather than once in all.
    first = (r * S + s) * per
    return jax.lax.scan(layer, x_b, (w, first + jnp.arange(per)), unroll=True)[0]

  def tick(carry, t):
    inputs, loop = carry
    inputs = constrain(inputs.at[0].set(loop[t % M]), 'stage')
    # Stage s runs microbatch (t - s) mod M in round (t - s) // M; outside 0 .. M R - 1 it
    # idles (its result is never read: in the bubble's ticks it reaches no output).
    m_S = (t - stage_ids) % M
    r_S = jnp.clip((t - stage_ids) // M, 0, R - 1)
    w_S = jax.tree.map(lambda w: _on_stages(jax.checkpoint(_select)(w, r_S), axis=0), grouped)
    aux_S = jax.tree.map(lambda a: a[m_S], aux)
    out = jax.vmap(run_stage, spmd_axis_name='stage')(w_S, inputs, aux_S, m_S, r_S, stage_ids)
    out = constrain(out, 'stage')
    # The last stage's result waits in the loop buffer for stage 0's next round (or is final).
    done = (t - (S - 1)) % M
    loop = loop.at[done].set(jnp.where(t >= S - 1, out[S - 1], loop[done]))
    return (jnp.roll(out, 1, axis=0), constrain(loop, None)), None

  start = constrain(jnp.zeros((S, *loop.shape[1:]), x.dtype), 'stage')
  (_, loop), _ = jax.lax.scan(tick, (start, loop), jnp.arange(pipeline.ticks))
  return jnp.swapaxes(loop, 0, 1).reshape(x.shape)


def _circular(w_L: jax.Array, S: int, R: int) -> jax.Array:
  """w_L [L, ...], split over the stages in contiguous blocks, as [R, S, L / (S R), ...] with
  group r S + s on stage s: the circular schedule's layout.

  Stage s holds groups s R .. s R + R - 1 and needs groups s, S + s, ..., (R - 1) S + s. The
  regrouping is done by collective permutes, pairs of stages exchanging one group each, so
  every stage sends and receives its own share of the stack; left to XLA, the reshape
  gathered the whole stack onto every device.
  """
  per = w_L.shape[0] // (S * R)
  if R == 1:
    return _on_stages(w_L.reshape(1, S, per, *w_L.shape[1:]), axis=1)

  def regroup(local):  # this stage's R blocked groups -> its R circular ones
    local = local.reshape(R, per, *local.shape[1:])
    out = []
    for r in range(R):  # group r S + s comes from stage (r S + s) // R, its slot (r S + s) % R
      received = 0
      for j in range(R):
        pairs = [((r * S + s) // R, s) for s in range(S) if (r * S + s) % R == j]
        received = received + jax.lax.ppermute(local[j], 'stage', pairs)
      out.append(received)
    return jnp.stack(out)

  spec = PartitionSpec('stage')
  regrouped = jax.shard_map(regroup, in_specs=spec, out_specs=spec, axis_names={'stage'})(w_L)
  # [S R, per, ...], stage s's R groups in rows s R .. s R + R - 1 -> [R, S, per, ...]
  regrouped = regrouped.reshape(S, R, per, *w_L.shape[1:])
  return _on_stages(jnp.swapaxes(regrouped, 0, 1), axis=1)


def _on_stages(w: jax.Array, axis: int) -> jax.Array:
  """w with its `axis` split over 'stage', its other axes left as the layers' rules place them
  (without this, XLA may gather every stage's layers onto every device)."""
  spec = [PartitionSpec.UNCONSTRAINED] * w.ndim
  spec[axis] = 'stage'
  return jax.lax.with_sharding_constraint(w, PartitionSpec(*spec))


def _select(w_RS, r_S: jax.Array) -> jax.Array:
  """w_RS[r_S[s], s] for every stage s, [S, ...]. A select per repeat rather than a gather:
  its transpose is a select too, which stays on each stage's devices, where the gather's
  (a scatter) made XLA gather the whole stack onto every device."""
  R = w_RS.shape[0]
  r_S = r_S.reshape(-1, *[1] * (w_RS.ndim - 2))
  picked = w_RS[0]
  for r in range(1, R):
    picked = jnp.where(r_S == r, w_RS[r], picked)
  return picked
