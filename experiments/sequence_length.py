"""Sequence length: loss, training speed and memory against the context a model trains on,
one model per family, on tiny shakespeare (characters).

  python -m launch.sweep --config=experiments/sequence_length.py --root=studies/seq_len
  python -m ar_jax.study --root=studies/seq_len          # -> studies/seq_len/report.md

Every run sees 1,024 characters a step (batch = 1024 / seq_len) for STEPS steps, so runs
differ only in how those characters are cut into windows. The context a model uses: the
transformer attends to the whole window; the LSTM carries its state across windows
(stateful, as char-rnn), seq_len being its backpropagation-through-time length; WaveNet's
receptive field is sized to twice the window; minGRU, Hawk and Mamba, whose recurrences are
linear in the state, start each window from a zero state, as the transformer does. Widths
are solved for the nanogpt_cpu transformer's 0.8M parameters.
"""

from ar_jax import models
from ar_jax.config import parse_arg
from ar_jax.studies import plots, reports
from experiments import shakespeare_char, sizing

VOCAB = 65
LENGTHS = ('32', '64', '128', '256', '512', '1024')
FAMILIES = ('transformer', 'lstm', 'wavenet', 'mingru', 'hawk', 'mamba')
TOKENS_PER_STEP = 1024
STEPS = 1000


def get_config(arg: str | None = None):
  args = parse_arg(arg, {'model': FAMILIES, 'seq_len': LENGTHS})
  seq_len = int(args['seq_len'])
  c = shakespeare_char.get_config('preset=nanogpt_cpu')
  reference = models.size(c.model, VOCAB, 64)[0]
  c.data.seq_len = seq_len  # set before the family's preset: WaveNet's depth follows it
  c.batch_size = TOKENS_PER_STEP // seq_len
  c.num_train_steps = STEPS
  c.eval_every_steps = c.checkpoint_every_steps = STEPS
  c.eval_batch_size = 8  # the same held-out windows' batching for every length
  if args['model'] == 'transformer':
    c.model.max_len = seq_len
  elif args['model'] == 'lstm':
    shakespeare_char.recurrent(c, 'lstm')
  elif args['model'] in shakespeare_char.LINEAR:
    shakespeare_char.linear_recurrent(c, args['model'])
  else:
    shakespeare_char.convolutional(c, wavenet=True)
  if args['model'] != 'transformer':
    sizing.match_width(c.model, reference, 0, VOCAB, seq_len)
  c.sample.max_new_tokens = min(c.sample.max_new_tokens, seq_len - 1)
  return c


def sweep(add, arg):
  del arg
  for model in FAMILIES:
    for seq_len in LENGTHS:
      add(model=model, seq_len=seq_len)


def report(runs, plots_dir):
  """Bits per char, training throughput and train-step memory against seq_len, per family."""
  finished = [r for r in runs if r.final]
  panels = (
    ('eval/bits_per_char', 'val bits per char'),
    ('train/tokens_per_sec', 'training tokens/s'),
    ('memory/total_bytes', 'train step memory (MiB)'),
  )
  fig = plots.figure(14, 4)
  axes = fig.subplots(1, 3)
  for model in FAMILIES:
    mine = sorted((r for r in finished if r.fields['model'] == model), key=_length)
    if not mine:
      continue
    lengths = [_length(r) for r in mine]
    for ax, (key, label) in zip(axes, panels, strict=True):
      values = [_value(r, key) for r in mine]
      ax.plot(lengths, values, marker='o', label=model)
      ax.set_xscale('log', base=2)
      ax.set_xlabel('seq_len (training window)')
      ax.set_ylabel(label)
      ax.grid(alpha=0.3)
  axes[0].legend()
  for ax in axes[1:]:  # the families' speeds and memory each span more than a factor of ten
    ax.set_yscale('log')
  plots.save(fig, f'{plots_dir}/sequence_length.png')
  body = [
    [
      r.fields['model'],
      _length(r),
      f'{_value(r, "eval/bits_per_char"):.3f}',
      f'{_value(r, "train/tokens_per_sec"):,.0f}',
      f'{_value(r, "memory/total_bytes"):.1f}',
    ]
    for r in sorted(finished, key=lambda r: (r.fields['model'], _length(r)))
  ]
  header = ('model', 'seq_len', 'val bits/char', 'train tok/s', 'train step MiB')
  return (
    '## Sequence length\n\n'
    + reports.markdown_table(header, body)
    + '\n\n![against sequence length](plots/sequence_length.png)'
  )


def _length(run) -> int:
  return int(run.fields['seq_len'])


def _value(run, key: str) -> float:
  if key == 'train/tokens_per_sec':
    return run.median(key)
  return run.final[key] / 2**20 if key.startswith('memory/') else run.final[key]
