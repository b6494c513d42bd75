"""A run evaluated on tasks of EleutherAI's lm-evaluation-harness (lm-eval 0.4):

  python -m ar_jax.lm_harness --workdir=DIR --tasks=lambada_openai,hellaswag [--limit=100] \
      [--include_path=DIR_OF_TASK_YAMLS] [--builtin_tasks=false] [--num_fewshot=N] \
      [--batch_size=16] [--max_length=N] [--seed=0] [--output=results.json]

prints lm-eval's results table, and with --output writes its results as JSON. From Python,
importing ar_jax.interop.harness registers the model 'ar_jax' with lm-eval (how requests are
read: its docstring). Needs the [eval] extra: pip install -e '.[eval]'.
"""

import json
import os
import sys

from absl import app, flags

from ar_jax import cli
from ar_jax.errors import check


def _define_flags():
  flags.DEFINE_string('workdir', None, 'A run directory written by ar_jax.main.')
  flags.DEFINE_list('tasks', None, 'lm-eval task (or group) names, comma-separated.')
  flags.DEFINE_string('include_path', None, 'A folder of task YAMLs of your own.')
  flags.DEFINE_bool('builtin_tasks', True, "Also look tasks up among lm-eval's own.")
  flags.DEFINE_integer('num_fewshot', None, "Few-shot examples per prompt; default: the task's.")
  flags.DEFINE_integer('batch_size', 16, 'Rows scored or decoded together.', lower_bound=1)
  flags.DEFINE_integer('max_length', 0, "Tokens of context; 0: the model's.", lower_bound=0)
  flags.DEFINE_integer('limit', None, 'Evaluate at most this many documents per task.')
  flags.DEFINE_integer('seed', 0, 'Random seed for sampled generation.')
  flags.DEFINE_string('output', None, 'Also write the results to this JSON file.')
  flags.mark_flags_as_required(['workdir', 'tasks'])


def _main():
  f = flags.FLAGS
  if f.output:
    folder = os.path.dirname(os.path.abspath(f.output))
    check(os.path.isdir(folder), f'--output={f.output}: folder {folder} does not exist')
  try:
    from ar_jax.interop import harness
  except ImportError as e:  # the [eval] extra is optional: one line says how to add it
    sys.exit(f'error: {e}')
  from lm_eval.utils import make_table  # there: harness imported lm-eval

  lm = harness.ArJaxLM(f.workdir, batch_size=f.batch_size, max_length=f.max_length, seed=f.seed)
  results = harness.evaluate(
    lm,
    f.tasks,
    include_path=f.include_path,
    builtin_tasks=f.builtin_tasks,
    num_fewshot=f.num_fewshot,
    limit=f.limit,
  )
  print(make_table(results))
  if results.get('groups'):
    print(make_table(results, 'groups'))
  if f.output:
    with open(f.output, 'w') as out:
      json.dump(results, out, indent=2, default=str)


def main(argv):
  del argv
  cli.run(_main)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
