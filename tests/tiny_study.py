"""A two-run study for the tests: tiny transformers of two widths on $AR_JAX_TEST_CORPUS."""

import os

from ar_jax.config import parse_arg
from ar_jax.studies import reports
from tests.helpers import tiny_config


def get_config(arg: str | None = None):
  args = parse_arg(arg, {'width': ('16', '32')})
  c = tiny_config(os.environ['AR_JAX_TEST_CORPUS'])
  c.model.d_model = int(args['width'])
  return c


def sweep(add, arg):
  del arg
  for width in ('16', '32'):
    add(width=width, seed=1, num_train_steps=4)


def report(runs, plots_dir):
  del plots_dir
  body = [[r.fields['width'], r.final['num_params']] for r in runs if r.final]
  return '## Parameters by width\n\n' + reports.markdown_table(('width', 'params'), body)
