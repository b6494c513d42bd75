"""The device mesh and the logical-axis rules that place parameters and batches on it."""

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ar_jax.errors import check

# Outermost first: neighbouring devices (the fastest links) share the inner axes. Pipeline
# stages exchange one activation per microbatch, the least traffic of the four, so 'stage'
# is the axis that crosses the slowest links.
AXES = ('stage', 'data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (stage, data, fsdp, tensor) mesh. One size may be -1: the devices left over; a
  size not given (stage, in configs older than pipelining) is 1.

  Without a -1 the mesh takes the first data * fsdp * tensor devices, so a run can use
  fewer devices than the host has (one device on an 8-device host: sizes 1, 1, 1).
  Multi-slice runs give across-slice (DCN) sizes, dcn_data and so on: the sizes above are
  then per slice (ICI), and each mesh axis spans both. A slice is a TPU slice, or a process
  on hardware without slices.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = [int(mesh_config.get(f'dcn_{a}', 1)) for a in AXES]
  check(all(d > 0 for d in dcn), f'mesh DCN sizes must be positive: {dcn}')
  per_slice = len(devices) // math.prod(dcn)
  sizes = [int(mesh_config.get(a, 1)) for a in AXES]
  described = ', '.join(f'{a}={s}' for a, s in zip(AXES, sizes, strict=True))
  check(all(s == -1 or s > 0 for s in sizes), f'mesh sizes must be positive or -1: {described}')
  check(sizes.count(-1) <= 1, f'at most one mesh size may be -1: {described}')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    check(
      per_slice % known == 0,
      f'mesh {described}: {per_slice} devices per slice are not divisible by {known}',
    )
    sizes[sizes.index(-1)] = per_slice // known
  check(
    math.prod(sizes) * math.prod(dcn) <= len(devices),
    f'mesh {described} needs {math.prod(sizes) * math.prod(dcn)} devices; '
    f'{len(devices)} are present',
  )
  axis_types = (AxisType.Auto,) * len(AXES)
  if math.prod(dcn) == 1:
    return jax.make_mesh(sizes, AXES, axis_types=axis_types, devices=devices[: math.prod(sizes)])
  slices = {getattr(d, 'slice_index', 0) for d in devices}
  grid = mesh_utils.create_hybrid_device_mesh(
    sizes, dcn, devices, process_is_granule=len(slices) == 1
  )
  return Mesh(grid, AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, leading_dims: int = 0) -> NamedSharding:
  """Batches [..., B, T] sharded on B over (data, fsdp); `leading_dims` dims before B."""
  return NamedSharding(mesh, PartitionSpec(*([None] * leading_dims), BATCH_AXES))


def process_rows(mesh: Mesh, process: int | None = None, process_of=None) -> tuple[int, int]:
  """(i, n): the devices of `process` (this one) hold block i of a batch's rows cut into n
  equal blocks, so it reads those rows. Processes that differ only along 'stage' or 'tensor'
  hold the same rows: n counts the distinct blocks, not the processes. process_of(device)
  (device.process_index) is a parameter for tests."""
  process = jax.process_index() if process is None else process
  process_of = process_of or (lambda d: d.process_index)
  dp = data_parallel_size(mesh)
  shards = batch_sharding(mesh).devices_indices_map((dp,))
  mine = sorted({index[0].start or 0 for d, index in shards.items() if process_of(d) == process})
  k = len(mine)
  check(
    mine == list(range(mine[0], mine[0] + k)) and mine[0] % k == 0,
    f'the mesh {dict(mesh.shape)} gives process {process} rows that are not one block of the '
    f'batch: {k} of its {dp} shards, starting at {mine}',
  )
  return mine[0] // k, dp // k


def bytes_on(device: jax.Device, tree: Any) -> int:
  """Bytes of the sharded arrays (or ShapeDtypeStructs with shardings) in tree that `device`
  holds."""
  total = 0
  for x in jax.tree.leaves(tree):
    index = x.sharding.devices_indices_map(x.shape)[device]
    shard = [len(range(*i.indices(n))) for i, n in zip(index, x.shape, strict=True)]
    total += math.prod(shard) * x.dtype.itemsize
  return total


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# The rules every family shares, read after the family's own. A name may have several
# rules: the first whose mesh axes are free (and divide the dimension) applies, so
# ('vocab', 'fsdp') shards an output head over fsdp when tensor is taken by its other axis.
SHARED_RULES = (
  # A stack of layers (scanned, with a leading 'layers' parameter axis) is split into
  # contiguous groups over the pipeline stages; see ar_jax/pipeline.py.
  ('layers', 'stage'),
  ('stage', 'stage'),
  ('vocab', 'tensor'),
  ('embed', 'fsdp'),
  ('vocab', 'fsdp'),
)


def rules(overrides: Sequence, family_rules: Sequence) -> tuple[tuple[str, Any], ...]:
  """The rules table: overrides, the batch over (data, fsdp), a family's rules, the shared
  ones. The batch comes before the family's names, so an activation [batch, ..., width]
  keeps fsdp for its batch and leaves its width whole."""
  table = (*overrides, ('batch', BATCH_AXES), *family_rules, *SHARED_RULES)
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in table)


def logical_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree whose leaves are boxed with logical axis names."""
  return jax.tree.map(
    lambda leaf: (
      NamedSharding(mesh, spec(leaf.names, leaf.value.shape, mesh, rules))
      if isinstance(leaf, nn.Partitioned)
      else replicated(mesh)
    ),
    tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def spec(
  names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Sequence
) -> PartitionSpec:
  """The PartitionSpec of an array whose axes have logical `names`.

  The rules are read in order; a rule applies to an axis not yet placed when its mesh axes
  are unused by the array's other axes and divide the axis's size. Mesh axes of size 1 are
  left out: they split nothing, and a later rule may place the axis where it does. So a
  dimension no rule can divide (a 65-character vocabulary over 8 shards) stays whole rather
  than failing: the rules describe intent, the shapes decide.
  """
  placed: list[Any] = [None] * len(names)
  used: set[str] = set()
  for name, axes in rules:
    axes = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if mesh.shape[a] > 1)
    for i, axis_name in enumerate(names):
      if (
        axis_name == name
        and axes
        and placed[i] is None
        and not used & set(axes)
        and shape[i] % math.prod(mesh.shape[a] for a in axes) == 0
      ):
        placed[i] = axes[0] if len(axes) == 1 else axes
        used |= set(axes)
  return PartitionSpec(*placed)


@contextlib.contextmanager
def context(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Mesh and rules in scope, so nn.with_logical_constraint resolves activations' names."""
  with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(r) for r in rules]):
    yield


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows -> one global array, split over the batch axes of the mesh."""
  return jax.make_array_from_process_local_data(sharding, local)
