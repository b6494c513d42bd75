"""Domain transfer: train on one corpus, evaluate on every corpus, byte level, as a matrix.

  python -m launch.sweep --config=experiments/domain_transfer.py --root=studies/transfer
  python -m ar_jax.study --root=studies/transfer          # -> studies/transfer/report.md

The corpora are tiny shakespeare (TFDS; English verse) and the embedded Python-source corpus
(this interpreter's standard library). Bytes are the one vocabulary both share, so every model
reads every corpus. One model per training corpus: the quickstart's transformer (0.86M
parameters, 256-byte context); each evaluation reads the same number of held-out bytes.
"""

from ar_jax import evaluation
from ar_jax.config import defaults, parse_arg
from ar_jax.studies import reports
from experiments import quickstart

CORPORA = ('shakespeare', 'python')
EVAL_BATCHES = 48  # x 8 x 256 = 98,304 held-out bytes of each corpus (of 111k and 3.8M)


def data_config(corpus: str):
  c = defaults().data
  c.tokenizer = 'byte'
  if corpus == 'shakespeare':
    c.name = 'tiny_shakespeare'
    c.eval_splits = ('validation', 'test')  # nanoGPT's val split: the last 10%
  else:
    c.name = 'python_stdlib'
  c.seq_len = 256
  return c


def get_config(arg: str | None = None):
  args = parse_arg(arg, {'train': CORPORA})
  c = quickstart.get_config()
  c.data = data_config(args['train'])
  c.eval_batches = EVAL_BATCHES
  c.sample.prompt = '\n'
  return c


def sweep(add, arg):
  del arg
  for corpus in CORPORA:
    add(train=corpus)


def report(runs, plots_dir):
  """Each finished run's latest checkpoint evaluated on every corpus (bits per byte)."""
  del plots_dir
  finished = [r for r in runs if r.final]
  body = []
  for r in finished:
    config = get_config(f'train={r.fields["train"]}')
    row = [r.fields['train']]
    for corpus in CORPORA:
      config.data = data_config(corpus)
      row.append(f'{evaluation.evaluate_workdir(config, r.workdir)["eval/bits_per_byte"]:.3f}')
    body.append(row)
  header = ('trained on \\ evaluated on', *CORPORA)
  return (
    '## Domain transfer (bits per byte, lower is better)\n\n'
    + reports.markdown_table(header, body)
    + f'\n\nEach cell: {EVAL_BATCHES} x 8 x 256 held-out bytes of the column corpus.'
  )
