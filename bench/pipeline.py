"""Pipeline bubbles on simulated devices: a transformer's train step split over 4 stages, by
GPipe and by the circular schedule (2 repeats), at 4, 8 and 16 microbatches, against the
same step without stages on the same 4 devices (data=4), beside the bubble's formula
(S - 1) / (M R + S - 1).

  python bench/pipeline.py [--repeats=5] [--text=PATH] [--tiny]

The model is the nanogpt_cpu preset's transformer at 8 scanned layers (so that 4 stages x 2
repeats split it), batch 64 x 64 characters, trained through the trainer's compiled step.
Simulated devices share the machine's cores, so a stage's idle ticks are not idle here: the
schedule computes on stand-in inputs in them (results never read) and the time that takes is
the bubble's, measured as 1 - t(no stages) / t(pipelined). What the formula does not
explain is printed per tick: the schedule's own work in each tick, which weighs more as
microbatches shrink. Medians of --repeats timings. Then each layout's memory per device
(XLA's analysis of the compiled step) for the same model at width 512 and batch 8, where the
parameters and their optimizer state outweigh the activations.
"""

import os
import pathlib
import sys
import tempfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=4'
).strip()

from absl import app, flags  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import timing  # noqa: E402

timing.define_flags('Small batches and one timing')
FLAGS = flags.FLAGS

STAGES = 4
MICROBATCHES = (4, 8, 16)
SCHEDULES = (('GPipe', 1), ('circular, 2 repeats', 2))
WIDE = 512  # the memory table's model width


def config(stages: int, microbatches: int, repeats: int, batch: int, seq_len: int):
  c = timing.ar_jax_config('transformer', batch, seq_len, 'float32', FLAGS.text)
  c.model.num_layers, c.model.scan_layers = 2 * STAGES, True
  c.mesh.stage, c.mesh.data = stages, 4 // stages
  c.pipeline_microbatches, c.pipeline_repeats = microbatches, repeats
  return c


def main(argv):
  del argv
  import jax

  from ar_jax import train
  from ar_jax.parallel import pipeline

  batch, seq_len, steps = (16, 16, 1) if FLAGS.tiny else (64, 64, 3)
  repeats = 1 if FLAGS.tiny else FLAGS.repeats
  print(f'{timing.cpu_model()}; {jax.device_count()} simulated devices; jax {jax.__version__}')
  print(f'transformer, 8 layers, batch {batch} x {seq_len}, {steps} steps per timing\n')

  def seconds_per_step(c):
    return batch * seq_len / timing.ar_jax_rate(c, steps, 1, repeats)

  ideal = seconds_per_step(config(1, 1, 1, batch, seq_len))
  columns = ('schedule', 'microbatches', 'step (ms)', 'bubble, measured', '(S-1)/(MR+S-1)')
  columns += ('beyond the formula, per tick (ms)',)
  print(f'| {" | ".join(columns)} |')
  print('|' + ' --- |' * len(columns))
  print(f'| no stages (data=4) | - | {ideal * 1e3:.1f} | - | - | - |')
  for name, r in SCHEDULES:
    for m in MICROBATCHES[:1] if FLAGS.tiny else MICROBATCHES:
      seconds = seconds_per_step(config(STAGES, m, r, batch, seq_len))
      p = pipeline.Pipeline(STAGES, m, r)
      # What the formula leaves unexplained: the step beyond the ideal's work spread over the
      # ticks, per tick (the roll, the loop buffer, the devices meeting at each collective).
      beyond = (seconds - ideal * p.ticks / (m * r)) / p.ticks
      figures = f'{1 - ideal / seconds:.2f} | {p.bubble:.2f} | {beyond * 1e3:.1f}'
      print(f'| {name} | {m} | {seconds * 1e3:.1f} | {figures} |', flush=True)

  print(f'\nmemory per device, d_model {WIDE}, batch 8 x {seq_len} (the parameters dominate):\n')
  print('| schedule | parameters and optimizer state (MiB) | temporaries (MiB) |')
  print('| --- | --- | --- |')
  for name, stages, r in (('no stages (data=4)', 1, 1), *((n, STAGES, r) for n, r in SCHEDULES)):
    c = config(stages, STAGES if stages > 1 else 1, r, 8, seq_len)
    c.model.d_model = WIDE
    memory = train.compile_only(c, tempfile.mkdtemp(prefix='bench_pipeline_'))
    state, temporaries = (
      memory[f'memory/{k}_bytes'] / 2**20 for k in ('params_and_state', 'temporaries')
    )
    print(f'| {name} | {state:.1f} | {temporaries:.1f} |')


if __name__ == '__main__':
  app.run(main)
