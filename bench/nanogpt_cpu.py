"""nanoGPT's shakespeare_char CPU setup end to end: val loss and training throughput.

  python bench/nanogpt_cpu.py [--workdir=DIR]

Reads tiny_shakespeare from $TFDS_DATA_DIR (default: ../shared/data/tensorflow_datasets).
Reference on the 2-core machine: nanoGPT's PyTorch code, val 1.874 in about 102 s at about
18,000 tokens/s. Targets: val loss (validation + test) <= 1.88, >= 20,000 tokens/s.
"""

import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
os.environ.setdefault('TFDS_DATA_DIR', str(REPO.parent / 'shared' / 'data' / 'tensorflow_datasets'))
sys.path.insert(0, str(REPO))

from ar_jax import cli, train  # noqa: E402
from ar_jax.monitor import flops  # noqa: E402
from experiments import shakespeare_char  # noqa: E402

flags.DEFINE_string('workdir', None, 'Where the run goes (default: a temporary directory).')
flags.DEFINE_integer('seed', 0, 'Seed of the run: initialisation and data order.')
flags.DEFINE_string('pos_encoding', 'rotary', 'Positions: rotary (the preset), learned (nanoGPT).')


def bench():
  workdir = flags.FLAGS.workdir or tempfile.mkdtemp(prefix='nanogpt_cpu_')
  config = shakespeare_char.get_config('preset=nanogpt_cpu')
  config.seed = flags.FLAGS.seed
  config.model.pos_encoding = flags.FLAGS.pos_encoding
  start = time.perf_counter()
  final = train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  logged = [json.loads(x) for x in pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  train_logs = [m for m in logged if 'train/tokens_per_sec' in m]
  # The first interval warms caches and threads; the rest are steady state.
  steady = train_logs[1:] or train_logs
  rate = statistics.median(m['train/tokens_per_sec'] for m in steady)
  mfu = statistics.median(m['train/mfu'] for m in steady)
  print(f'workdir: {workdir}')
  print(f'val loss (validation + test, nats/char): {final["eval/loss"]:.4f}  (target <= 1.88)')
  print(f'val bits/char: {final["eval/bits_per_char"]:.4f}')
  print(f'train tokens/s, median of {len(steady)} log intervals: {rate:,.0f}  (target >= 20,000)')
  peak, source = flops.peak_flops(jax.devices()[0])
  print(f'MFU against {peak / 1e9:.0f} GFLOP/s ({source}): {100 * mfu:.1f}%')
  print(f'wall time, end to end (data, compile, training, evals, sample): {wall:.1f} s')


def main(argv):
  del argv
  cli.run(bench)


if __name__ == '__main__':
  app.run(main)
