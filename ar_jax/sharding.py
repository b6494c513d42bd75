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

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh. One size may be -1: the devices left over.

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
  sizes = [int(mesh_config[a]) for a in AXES]
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


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree whose leaves are boxed with logical axis names.

  A dimension the mesh axes do not divide (a 65-character vocabulary over 8 tensor shards)
  stays replicated rather than failing: the rules describe intent, the shapes decide.
  """
  specs = nn.get_partition_spec(tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, [tuple(r) for r in rules])
  return jax.tree.map(_divisible, nn.unbox(tree), shardings)


def _divisible(leaf, named: NamedSharding) -> NamedSharding:
  spec = []
  for size, axes in zip(leaf.shape, tuple(named.spec) + (None,) * leaf.ndim, strict=False):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    shards = math.prod(named.mesh.shape[a] for a in names)
    spec.append(axes if size % shards == 0 else None)
  return NamedSharding(named.mesh, PartitionSpec(*spec))


@contextlib.contextmanager
def context(mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Iterator[None]:
  """Mesh and rules in scope, so nn.with_logical_constraint resolves activations' names."""
  with jax.set_mesh(mesh), nn.logical_axis_rules([tuple(r) for r in rules]):
    yield


def global_batch(local: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows -> one global array, split over the batch axes of the mesh."""
  return jax.make_array_from_process_local_data(sharding, local)
