"""The benchmarks that the README's figures come from still run (their ar_jax halves, at
small shapes): a script that rots fails here, not in front of a reader."""

import os
import sys

from tests.helpers import REPO, run


def test_vs_pytorch_tiny_runs_without_torch():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one CPU device, as a user
  out = run([sys.executable, 'bench/vs_pytorch.py', '--tiny'], timeout=300, cwd=REPO, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert lines[0].startswith('training tokens/s (')
  assert [line.split()[0] for line in lines[2:]] == ['gpt']


def test_gpu_bench_tiny_runs_on_cpu():
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  out = run([sys.executable, 'bench/gpu.py', '--tiny'], timeout=300, cwd=REPO, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  for line in ('bf16 matmul', 'GPT-2 (2 layers', 'LSTM 2 x 32', 'decoding, KV cache, batch 1'):
    assert line in out.stdout
