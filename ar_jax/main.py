"""Train (and evaluate) a model: python -m ar_jax.main --config=experiments/X.py[:ARG] --workdir=DIR

Starting again with the same workdir resumes from its latest checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

from ar_jax import cli, train

config_flags.DEFINE_config_file('config', None, 'experiments/NAME.py[:ARG]', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory of the run: checkpoints, metrics, samples.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train (and evaluate), or evaluate only.')
flags.mark_flags_as_required(['config', 'workdir'])


def _main():
  f = flags.FLAGS
  if f.mode == 'eval':
    metrics = train.evaluate_workdir(f.config, f.workdir)
  else:
    metrics = train.train_and_evaluate(f.config, f.workdir)
  print(' '.join(f'{k}={v:.4f}' for k, v in metrics.items()))


def main(argv):
  del argv
  cli.run(_main)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
