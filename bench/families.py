"""The model comparison's models on one machine: every model of experiments/compare_families.py,
at matched parameters and at matched FLOPs, sized and configured as that study trains them.

  python bench/families.py [--repeats=5] [--text=PATH] [--tiny]

For each: training tokens/s through the trainer's compiled step (12 x 64 windows of random
characters, 50 steps per dispatch), the train step's memory per device (XLA's analysis, its
total as ar_jax.study's report gives it), and greedy decoding tokens/s (256 new
tokens after a one-token prompt, batch 1, from the cache; 63 for the transformer, whose
context is the 64-character window, as the runs' own samples are). The study's runs record the same
while they train, on whatever else the machine is doing; this measures them one at a time,
for the study's table. Medians of --repeats timings.
"""

import pathlib
import sys
import tempfile

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import timing  # noqa: E402

timing.define_flags('A few steps on small windows')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax

  from ar_jax import models, train
  from experiments import compare_families

  steps, new_tokens = (2, 8) if FLAGS.tiny else (50, 256)
  repeats = 1 if FLAGS.tiny else FLAGS.repeats
  print(f'# {timing.cpu_model()}; {jax.devices()[0].device_kind}; repeats {repeats}\n')
  print('| model | matched | parameters | train tokens/s | train step MiB | decode tokens/s |')
  print('| --- | --- | --- | --- | --- | --- |')
  for match in compare_families.CHOICES['match']:
    for name in compare_families.CHOICES['model']:
      if name == 'transformer' and match == 'flops':
        continue  # the reference: the same model as match=params
      c = compare_families.get_config(f'model={name},match={match},text={FLAGS.text}')
      if FLAGS.tiny:
        c.batch_size, c.data.seq_len = 2, 16
      params = models.size(c.model, compare_families.VOCAB, c.data.seq_len)[0]
      memory = train.compile_only(c, tempfile.mkdtemp(prefix='bench_families_'))
      mib = memory['memory/total_bytes'] / 2**20  # as ar_jax.study reports it
      rate = timing.ar_jax_rate(c, steps, steps, repeats)
      decode = timing.decoding_rate(c, new_tokens, repeats)
      row = f'{params / 1e6:.2f}M | {rate:,.0f} | {mib:.1f} | {decode:,.0f}'
      print(f'| {name} | {match} | {row} |', flush=True)


if __name__ == '__main__':
  app.run(main)
