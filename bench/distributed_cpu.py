"""The cost of partitioning, for every model family: training tokens/s on 1 simulated CPU
device against 8 (data, fsdp and, where a family has a tensor rule, tensor parallel) on the
same cores, and the parameters and optimizer state each device holds.

  python bench/distributed_cpu.py [--steps=60]

Each setting runs `ar_jax.main` in its own process (the device count is fixed when JAX
starts), with this file as its experiment config: `--config=bench/distributed_cpu.py:model=lstm`.
The simulated devices share the machine's cores, so 8 devices cannot be faster than 1: the
ratios measure what partitioning costs (collectives, smaller matmuls), and the memory
column what it saves.
"""

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

from ar_jax import models
from ar_jax.config import parse_arg

REPO = pathlib.Path(__file__).resolve().parent.parent
CHOICES = {
  'model': ('transformer', 'lstm', 'wavenet', 'pixelcnn'),
  # The LSTM's gates inside the time loop: whole on every device, or split over tensor.
  'gates': ('whole', 'tensor'),
}
MODELS = {
  'transformer': dict(name='transformer', num_layers=4, num_heads=4, d_model=128, max_len=256),
  'lstm': dict(name='rnn', cell='lstm', num_layers=2, d_embed=128, d_hidden=256),
  'wavenet': dict(name='conv', channels=64, layers_per_block=8, skip_channels=128),
}
# (label, devices, (data, fsdp, tensor)); pixelcnn has no tensor rule.
MESHES = [
  ('1 device', 1, (1, 1, 1)),
  ('data 8', 8, (8, 1, 1)),
  ('fsdp 8', 8, (1, 8, 1)),
  ('data 2 x tensor 4', 8, (2, 1, 4)),
]


def get_config(arg: str | None = None):
  """The experiment each setting runs: a family on the quickstart's data (byte-level Python
  sources, 8 x 256 tokens a step), PixelCNN on the 8 x 8 digits."""
  args = parse_arg(arg, CHOICES)
  if args['model'] == 'pixelcnn':
    from experiments import pixelcnn  # noqa: PLC0415 (repository root on the path)

    c = pixelcnn.get_config('dataset=digits')
    c.batch_size = 32
  else:
    from experiments import quickstart  # noqa: PLC0415

    c = quickstart.get_config()
    c.model = models.default_config(MODELS[args['model']]['name'])
    c.model.update(MODELS[args['model']])
  if args['gates'] == 'tensor':
    c.sharding_rules = (('rnn_gates', 'tensor'), ('rnn_step_gates', 'tensor'))
  c.steps_per_dispatch = 5
  c.log_every_steps = 10
  c.eval_every_steps = c.checkpoint_every_steps = 10**6
  c.eval_batches = 1
  c.sample.max_new_tokens = 1
  return c


def measure(arg: str, devices: int, mesh: tuple[int, int, int], steps: int) -> tuple[float, float]:
  """(median tokens/s after the first log, parameter + optimizer bytes per device)."""
  workdir = tempfile.mkdtemp(prefix='distributed_bench_')
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  command = [
    sys.executable,
    '-m',
    'ar_jax.main',
    f'--config=bench/distributed_cpu.py:{arg}',
    f'--workdir={workdir}',
    f'--config.num_train_steps={steps}',
    *(f'--config.mesh.{a}={n}' for a, n in zip(('data', 'fsdp', 'tensor'), mesh, strict=True)),
  ]
  out = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  if out.returncode:
    sys.exit(f'{" ".join(command)} failed:\n{out.stderr[-3000:]}')
  logs = [json.loads(x) for x in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  steady = [m['train/tokens_per_sec'] for m in logs if 'train/tokens_per_sec' in m][1:]
  final = json.loads(pathlib.Path(workdir, 'final.json').read_text())
  return statistics.median(steady), final['memory/params_and_state_bytes']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=60, help='train steps per setting')
  steps = parser.parse_args().steps
  print(f'{steps} steps per setting; tokens/s median of the logs after the first.')
  print('| model | mesh | tokens/s | vs 1 device | state per device | vs 1 device |')
  print('| --- | --- | --- | --- | --- | --- |')
  settings = [(m, '', mesh) for m in CHOICES['model'] for mesh in MESHES]
  settings.append(('lstm', 'gates=tensor', ('data 2 x tensor 4, gates split', 8, (2, 1, 4))))
  base = {}
  for model, extra, (label, devices, mesh) in settings:
    if model == 'pixelcnn' and mesh[2] > 1:
      continue
    rate, state = measure(','.join(filter(None, [f'model={model}', extra])), devices, mesh, steps)
    base.setdefault(model, (rate, state))
    print(
      f'| {model} | {label} | {rate:,.0f} | {rate / base[model][0]:.2f}x | '
      f'{state / 2**20:.2f} MiB | {state / base[model][1]:.3f} |',
      flush=True,
    )


if __name__ == '__main__':
  main()
