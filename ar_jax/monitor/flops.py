"""Peak FLOP rates per device, for model FLOPs utilisation (MFU)."""

import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

# Where a measured peak is kept: measured once per machine, so MFU is comparable across runs.
CACHE_DIR = os.environ.get('AR_JAX_CACHE_DIR', os.path.expanduser('~/.cache/ar_jax'))

# Dense bfloat16 peak FLOP/s per device (per chip for TPUs), from the vendors' data sheets.
# Matched as substrings of jax.Device.device_kind, most specific first.
PEAK_FLOPS = (
  ('H200', 989e12),
  ('H100', 989e12),
  ('A100', 312e12),
  ('TPU v6', 918e12),
  ('TPU v5p', 459e12),
  ('TPU v5 lite', 197e12),
  ('TPU v5e', 197e12),
  ('TPU v4', 275e12),
)


def peak_flops(device: jax.Device, dtype: str = 'float32') -> tuple[float, str]:
  """(peak FLOP/s, where the figure comes from) for one device: the data sheet's, or for a
  device without one (CPUs) the rate of a matmul of `dtype` operands, measured once per
  machine and dtype and cached (a CPU's bf16 matrix units run several times its float32
  rate). Every process of a run gets process 0's figure, so their MFUs are comparable."""
  for kind, flops in PEAK_FLOPS:
    if kind.lower() in device.device_kind.lower():
      return flops, f'{kind} bf16 data sheet'
  machine = f'{device.device_kind}: {_processor()}, {os.cpu_count()} cores'
  if dtype != 'float32':
    machine = f'{machine}, {dtype}'
  path = os.path.join(CACHE_DIR, 'peak_flops.json')
  cached = _read_json(path)
  if machine not in cached:
    cached[machine] = measured_matmul_flops(dtype)
    os.makedirs(CACHE_DIR, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'  # concurrent runs on one machine each write whole
    with open(tmp, 'w') as f:
      json.dump({**_read_json(path), machine: cached[machine]}, f, indent=2)
    os.replace(tmp, path)
  peak = cached[machine]
  if jax.process_count() > 1:
    peak = float(multihost_utils.broadcast_one_to_all(np.float64(peak)))
  return peak, f'measured matmul on {machine}, cached in {path}'


def _processor() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(ln.split(':', 1)[1].strip() for ln in f if ln.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor() or platform.machine()


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):  # none yet, or unreadable: measured again
    return {}


def measured_matmul_flops(dtype: str = 'float32', n: int = 1024, repeats: int = 10) -> float:
  """The rate this device reaches on a large matmul of `dtype` operands, accumulated in
  float32 (or wider): the fallback peak (CPUs)."""
  a = jnp.ones((n, n), dtype)
  wide = jnp.promote_types(jnp.float32, dtype)
  matmul = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=wide))
  matmul(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / sorted(times)[len(times) // 2]
