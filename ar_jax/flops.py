"""Peak FLOP rates per device, for model FLOPs utilisation (MFU)."""

import functools
import time

import jax
import jax.numpy as jnp

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


def peak_flops(device: jax.Device) -> tuple[float, str]:
  """(peak FLOP/s, where the figure comes from) for one device."""
  for kind, flops in PEAK_FLOPS:
    if kind.lower() in device.device_kind.lower():
      return flops, f'{kind} bf16 data sheet'
  return measured_matmul_flops(), f'measured f32 matmul on {device.device_kind}'


@functools.cache
def measured_matmul_flops(n: int = 1024, repeats: int = 10) -> float:
  """The rate this device reaches on a large float32 matmul: the fallback peak (CPUs)."""
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * n**3 / sorted(times)[len(times) // 2]
