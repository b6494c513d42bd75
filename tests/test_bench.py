"""The benchmarks that the README's figures come from still run (their ar_jax halves, at
small shapes): a script that rots fails here, not in front of a reader."""

import sys

from tests.helpers import REPO, run, subprocess_env


def test_vs_pytorch_tiny_runs_without_torch():
  env = subprocess_env()  # one CPU device, as a user
  out = run([sys.executable, 'bench/vs_pytorch.py', '--tiny'], timeout=300, cwd=REPO, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert lines[0].startswith('training tokens/s (')
  assert [line.split()[0] for line in lines[2:]] == ['gpt']


def test_gpu_bench_tiny_runs_on_cpu():
  env = subprocess_env()
  out = run([sys.executable, 'bench/gpu.py', '--tiny'], timeout=300, cwd=REPO, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  for line in ('bf16 matmul', 'GPT-2 (2 layers', 'LSTM 2 x 32', 'decoding, KV cache, batch 1'):
    assert line in out.stdout
