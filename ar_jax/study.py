"""A sweep's runs reduced to one table and a report: python -m ar_jax.study --root=DIR

Writes ROOT/study.csv, ROOT/report.md and its plots (ar_jax/studies/reports.py).
"""

from absl import app, flags

from ar_jax import cli
from ar_jax.studies import reports

flags.DEFINE_string('root', None, 'The --root of a sweep (launch.sweep).')
flags.DEFINE_string(
  'experiment',
  None,
  "The experiment file whose report() adds sections (default: sweep.json's, if it lies "
  'inside the current directory). It runs as code: name only a file you trust.',
)
flags.mark_flag_as_required('root')


def main(argv):
  del argv
  cli.run(lambda: print(reports.write_report(flags.FLAGS.root, flags.FLAGS.experiment)))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
