"""Train (and evaluate) a model: python -m ar_jax.main --config=experiments/X.py[:ARG] --workdir=DIR

Starting again with the same workdir resumes from its latest checkpoint.
"""

import jax
from absl import app, flags
from ml_collections import config_flags

from ar_jax import cli, evaluation, train
from ar_jax.parallel import distributed

config_flags.DEFINE_config_file('config', None, 'experiments/NAME.py[:ARG]', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory of the run: checkpoints, metrics, samples.')
flags.DEFINE_enum(
  'mode',
  'train',
  ['train', 'eval', 'compile_only'],
  'train (and evaluate); evaluate the latest checkpoint; or compile the train step for the '
  'configured mesh and print its memory per device, to catch what does not fit before a job.',
)
flags.DEFINE_bool(
  'allow_restart',
  False,
  'Start again from step 0 in a workdir whose history (metrics, final.json, checkpoints moved '
  'aside) has no checkpoint to resume from; the old history is moved into WORKDIR/previous.TIME.',
)
flags.DEFINE_string('coordinator_address', '', 'host:port of process 0, for multi-process runs.')
flags.DEFINE_integer('num_processes', 1, 'Processes in a multi-process run.')
flags.DEFINE_integer('process_id', 0, 'This process, 0 .. num_processes - 1.')
flags.mark_flags_as_required(['config', 'workdir'])


def _main():
  f = flags.FLAGS
  distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
  if f.mode == 'eval':
    metrics = evaluation.evaluate_workdir(f.config, f.workdir)
  elif f.mode == 'compile_only':
    metrics = train.compile_only(f.config, f.workdir)
  else:
    metrics = train.train_and_evaluate(f.config, f.workdir, allow_restart=f.allow_restart)
  if jax.process_index() == 0:
    print(' '.join(f'{k}={v:.4f}' for k, v in metrics.items()))


def main(argv):
  del argv
  cli.run(_main)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
