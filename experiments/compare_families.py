"""Model comparison: the Elman RNN, LSTM, GRU, minGRU, minLSTM, Hawk, Mamba, causal conv,
WaveNet and the transformer on tiny shakespeare (characters), at matched parameter counts
and at matched training FLOPs, 3 seeds each, ranked by validation bits per character.

  python -m launch.sweep --config=experiments/compare_families.py --root=studies/families
  python -m ar_jax.study --root=studies/families          # -> studies/families/report.md

Every model trains on the nanogpt_cpu preset's data and schedule (experiments/
shakespeare_char.py: 12 x 64 characters a step), each family with its own preset choices
(the recurrent ones statefully). The transformer is the reference (0.8M parameters); every
other model's width is solved so that it has the transformer's parameter count
(match=params) or its training FLOPs per token, hence its training FLOPs, as every run sees
the same tokens (match=flops). Arg keys: model, match, and steps (2000, nanoGPT's CPU run,
unless given: 500 for a quick look, `--config=experiments/compare_families.py:steps=500`),
and text=PATH to read the corpus from a text file (see experiments/shakespeare_char.py).
"""

from ar_jax import models
from ar_jax.config import parse_arg
from ar_jax.errors import check
from ar_jax.studies import reports
from experiments import shakespeare_char, sizing

VOCAB = 65  # tiny shakespeare's characters: what the char tokenizer builds from its train split
CHOICES = {
  'model': shakespeare_char.CHOICES['model'],
  'match': ('params', 'flops'),
  'steps': None,  # training steps: 2000 (nanoGPT's CPU run) unless given
  'text': None,  # the corpus as a text file instead of TFDS (experiments/shakespeare_char.py)
}
SEEDS = 3


def get_config(arg: str | None = None):
  args = parse_arg(arg, CHOICES)
  text = f',text={args["text"]}' if args['text'] else ''
  c = shakespeare_char.get_config(f'preset=nanogpt_cpu,model={args["model"]}{text}')
  steps = args['steps'] or '2000'
  check(steps.isdigit() and int(steps) >= 4, f'config arg steps={steps!r}: an integer >= 4')
  c.num_train_steps = int(steps)
  c.eval_every_steps = c.num_train_steps // 4  # four points on each learning curve
  if args['model'] != 'transformer':
    reference = shakespeare_char.get_config('preset=nanogpt_cpu').model
    which = 0 if args['match'] == 'params' else 1
    target = models.size(reference, VOCAB, c.data.seq_len)[which]
    sizing.match_width(c.model, target, which, VOCAB, c.data.seq_len)
  return c


def sweep(add, arg):
  del arg  # steps=... reaches every run's config through the sweep's arg
  for match in CHOICES['match']:
    for model in CHOICES['model']:
      if model == 'transformer' and match == 'flops':
        continue  # the reference: the same run as match=params
      for seed in range(SEEDS):
        add(model=model, match=match, seed=seed)


def report(runs, plots_dir):
  """One ranking per matching, each family's size and compute beside its bits per char."""
  del plots_dir
  sections = []
  reference = [r for r in runs if r.fields['model'] == 'transformer']
  for match in CHOICES['match']:
    chosen = [r for r in runs if r.fields['match'] == match] + (
      reference if match == 'flops' else []
    )
    groups = reports.summaries(chosen, 'eval/bits_per_char')
    body = [
      [
        i + 1,
        g.runs[0].fields['model'],
        f'{g.stat("num_params")[0] / 1e6:.2f}M',
        f'{g.runs[0].train_flops:.3g}',
        reports.pm(*g.stat('eval/bits_per_char')),
        len(g.runs),
      ]
      for i, g in enumerate(groups)
    ]
    header = ('rank', 'model', 'params', 'train FLOPs', 'val bits/char', 'seeds')
    sections.append(f'## Matched {match}\n\n' + reports.markdown_table(header, body))
  return '\n\n'.join(sections)
