"""The matmul rates behind bench/vs_pytorch.py's ratios on a CPU: XLA's float32 and bf16
(bf16 operands, float32 result) against PyTorch's float32, at the shapes the benchmarked
models multiply (the LSTM's recurrent step and the nanogpt_cpu GPT's projections).

  python bench/matmul_cpu.py      # PyTorch's column needs pip install -e '.[bench]'
"""

import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from bench.timing import cpu_model  # noqa: E402

SHAPES = ((32, 512, 2048), (32, 2048, 512), (768, 128, 512), (768, 512, 128))  # M, K, N


def gflops(fn, args, flop: int, calls: int = 200, repeats: int = 5) -> float:
  """FLOP rate of fn(*args) (blocking), median of repeats."""
  fn(*args)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(calls):
      fn(*args)
    times.append((time.perf_counter() - start) / calls)
  return flop / statistics.median(times) / 1e9


def main():
  try:
    import torch
  except ImportError:
    torch = None
  print(f'matmul GFLOP/s ({cpu_model()}; jax {jax.__version__}; medians of 5):')
  print(f'  {"M x K x N":>16s} {"XLA f32":>8s} {"XLA bf16":>9s} {"PyTorch f32":>12s}')
  rng = np.random.default_rng(0)
  f32 = jax.jit(lambda x, y: x @ y)
  half = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  for M, K, N in SHAPES:
    a, b = (rng.standard_normal(s, np.float32) for s in ((M, K), (K, N)))
    a16, b16 = (jnp.asarray(x, jnp.bfloat16) for x in (a, b))
    flop = 2 * M * K * N
    ours = gflops(
      lambda x, y: f32(x, y).block_until_ready(), (jnp.asarray(a), jnp.asarray(b)), flop
    )
    bf16 = gflops(lambda x, y: half(x, y).block_until_ready(), (a16, b16), flop)
    theirs = '-'
    if torch is not None:
      theirs = f'{gflops(torch.matmul, (torch.from_numpy(a), torch.from_numpy(b)), flop):,.0f}'
    print(f'  {f"{M} x {K} x {N}":>16s} {ours:8,.0f} {bf16:9,.0f} {theirs:>12s}')


if __name__ == '__main__':
  main()
