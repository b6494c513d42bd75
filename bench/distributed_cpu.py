"""The cost of partitioning: the transformer's training tokens/s and MFU on 1 simulated CPU
device against 8 (data parallel, and data x fsdp x tensor = 2 x 2 x 2) on the same 2 cores.

  python bench/distributed_cpu.py

Each setting runs in its own process (the device count is fixed when JAX starts).
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

REPO = pathlib.Path(__file__).resolve().parent.parent
SETTINGS = [
  ('1 device', 1, (1, 1, 1)),
  ('8 devices, data 8', 8, (8, 1, 1)),
  ('8 devices, 2 x 2 x 2', 8, (2, 2, 2)),
]


def measure(devices: int, mesh: tuple[int, int, int]) -> tuple[float, float]:
  workdir = tempfile.mkdtemp(prefix='distributed_bench_')
  data, fsdp, tensor = mesh
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  command = [
    sys.executable,
    '-m',
    'ar_jax.main',
    '--config=experiments/quickstart.py',
    f'--workdir={workdir}',
    '--config.num_train_steps=300',
    '--config.log_every_steps=50',
    '--config.eval_every_steps=1000',
    '--config.checkpoint_every_steps=1000',
    '--config.eval_batches=1',
    '--config.sample.max_new_tokens=1',
    f'--config.mesh.data={data}',
    f'--config.mesh.fsdp={fsdp}',
    f'--config.mesh.tensor={tensor}',
  ]
  subprocess.run(command, cwd=REPO, env=env, check=True, capture_output=True)
  logs = [json.loads(x) for x in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  steady = [m for m in logs if 'train/tokens_per_sec' in m][1:]
  return (
    statistics.median(m['train/tokens_per_sec'] for m in steady),
    statistics.median(m['train/mfu'] for m in steady),
  )


def main():
  print('quickstart transformer (0.86M parameters, batch 8 x 256 tokens), 300 steps:')
  base = None
  for name, devices, mesh in SETTINGS:
    rate, mfu = measure(devices, mesh)
    base = base or rate
    print(
      f'  {name:22s} {rate:8,.0f} tokens/s  ({rate / base:.2f}x of 1 device)  '
      f'MFU {100 * mfu:.1f}% of the 2 cores'
    )


if __name__ == '__main__':
  main()
