"""Scaling study: a grid of model sizes by compute budgets on the embedded Python-source corpus
(byte level, 28M training bytes: no run repeats data), for the transformer, the LSTM, Hawk
and Mamba, one family at a time or transformer, LSTM and Hawk in one study.

  python -m launch.sweep --config=experiments/scaling.py:grid=small --root=studies/scaling_small
  python -m ar_jax.study --root=studies/scaling_small
  python -m launch.sweep --config=experiments/scaling.py:grid=full,family=lstm --root=...
  python -m launch.sweep --config=experiments/scaling.py:grid=medium,family=all --root=...

Each compute budget C is spent by every size N with D = C / (6 N) training tokens (the IsoFLOP
design of Hoffmann et al. 2022, Approach 2), each run with its own cosine schedule ending at
its last step. The report fits L(N, D) = E + A / N^alpha + B / D^beta (Approach 3) with
bootstrap intervals, the IsoFLOP parabolas and the compute-optimal N*(C), D*(C) both ways
(ar_jax/scaling.py). N counts every parameter, embeddings included; C is recorded both as 6ND
and exactly (the model's own FLOP count), each labelled.

Arg keys: grid=small (minutes on a 2-core CPU per family), medium (22 to 40 minutes a family
on one core) or full (hours), family=transformer, lstm, hawk, mamba (widths solved to the
transformer's sizes) or all (the transformer, the LSTM and Hawk; each run names its family;
the report fits each family's law and sets their frontiers and exponents side by side), and
size, budget (set by the sweep). Mamba is not in all: its selective state (d_state = 16
numbers per channel) makes its runs about ten times as long on a CPU as the others' at the
same 6ND budget (its FLOPs are mostly the scan's, which 6N does not count), so it cannot
share their budgets there.
"""

import copy
import functools
import itertools
import warnings

import numpy as np

from ar_jax import models
from ar_jax.config import defaults, parse_arg
from ar_jax.studies import plots, reports, scaling
from experiments import sizing

VOCAB = 257  # the byte tokenizer: 256 values and end-of-text
TOKENS_PER_STEP = 16 * 64
# Transformer shapes (layers, d_model, heads) by name; the name is its parameter count.
SIZES = {
  '10k': (2, 16, 2),
  '20k': (2, 24, 2),
  '33k': (2, 32, 2),
  '68k': (2, 48, 2),
  '164k': (3, 64, 4),
  '468k': (4, 96, 4),
  '820k': (4, 128, 4),
  '1.6M': (5, 160, 5),
  '4.8M': (6, 256, 8),
  '9.9M': (8, 320, 8),
}
GRIDS = {  # sizes x budgets (training FLOPs, 6ND)
  'small': (('10k', '20k', '33k', '68k'), ('3e10', '1e11', '3e11', '1e12')),
  'medium': (
    ('20k', '33k', '68k', '164k', '468k', '820k', '1.6M'),
    ('3e11', '1e12', '3e12', '1e13'),
  ),
  'full': (('164k', '468k', '820k', '1.6M', '4.8M', '9.9M'), ('1e12', '3e12', '1e13', '3e13')),
}
MIN_STEPS = 60  # fewer steps than this is mostly warmup: such a (size, budget) is left out
# Nor a run past this many tokens per parameter: far past its budget's compute optimum (about
# 20 at scale, Hoffmann et al. 2022; 50 to 110 for these transformers at 1e12 to 1e13 FLOPs),
# it costs the most time and tells the fit the least.
MAX_TOKENS_PER_PARAM = 2000
STEPS_PER_DISPATCH = 20  # small steps: the dispatch overhead matters on CPU
FAMILIES = ('transformer', 'lstm', 'hawk')  # family=all
CHOICES = {
  'grid': tuple(GRIDS),
  'family': (*FAMILIES, 'mamba', 'all'),
  'size': tuple(SIZES),
  'budget': tuple(sorted({b for _, budgets in GRIDS.values() for b in budgets}, key=float)),
}


def model_config(family: str, size: str):
  return copy.deepcopy(_model_config(family, size))


@functools.cache  # solving a width takes up to a second, and a sweep asks for each many times
def _model_config(family: str, size: str):
  layers, width, heads = SIZES[size]
  c = defaults().model
  c.num_layers, c.d_model, c.num_heads = layers, width, heads
  c.max_len = 64
  c.pos_encoding = 'rotary'
  c.use_bias = False
  c.tie_embeddings = True
  if family == 'transformer':
    return c
  target = models.size(c, VOCAB, 64)[0]
  if family == 'lstm':  # one layer per two transformer layers, as wide as matches its size
    c = models.default_config('rnn')
    c.cell = 'lstm'
    c.num_layers = max(1, layers // 2)
    c.d_embed = width
  elif family == 'hawk':  # a block per transformer layer: each mixes over time, then an MLP
    c = models.default_config('hawk')
    c.num_layers = layers
  else:  # Mamba: two blocks per transformer layer (a block has about half a layer's weights)
    c = models.default_config('mamba')
    c.num_layers = 2 * layers
  sizing.match_width(c, target, 0, VOCAB, 64)
  return c


def steps(model, budget: str) -> int:
  """Steps that spend the budget (6ND). Long runs are rounded to whole dispatches (one
  compiled program); short ones, where that would miss the budget by over 5%, are not."""
  exact = float(budget) / (6 * models.size(model, VOCAB, 64)[0] * TOKENS_PER_STEP)
  grain = STEPS_PER_DISPATCH if exact >= 10 * STEPS_PER_DISPATCH else 1
  return grain * round(exact / grain)


def get_config(arg: str | None = None):
  args = parse_arg(arg, CHOICES)
  c = defaults()
  c.data.name = 'python_stdlib'
  c.data.tokenizer = 'byte'
  c.data.seq_len = 64
  c.batch_size = TOKENS_PER_STEP // 64
  # family=all is the sweep's arg alone: each of its runs names its own family.
  c.model = model_config(args['family'].replace('all', 'transformer'), args['size'])
  c.num_train_steps = steps(c.model, args['budget'])
  c.optim.learning_rate = 2e-3  # small models, short runs
  c.optim.min_learning_rate = 2e-4
  c.optim.warmup_steps = min(100, c.num_train_steps // 10)
  c.steps_per_dispatch = STEPS_PER_DISPATCH
  c.log_every_steps = STEPS_PER_DISPATCH * max(1, c.num_train_steps // 200)  # ~10 log points
  c.eval_every_steps = c.checkpoint_every_steps = c.num_train_steps
  c.eval_batches = 64  # 64 x 16 x 64 = 65,536 held-out bytes, the same for every run
  c.sample.prompt = 'def '
  c.sample.max_new_tokens = 60
  return c


def sweep(add, arg):
  args = parse_arg(arg, CHOICES)
  sizes, budgets = GRIDS[args['grid']]
  every = args['family'] == 'all'
  for family in FAMILIES if every else (args['family'],):
    for budget in budgets:
      for size in sizes:
        model = model_config(family, size)
        n, count = models.size(model, VOCAB, 64)[0], steps(model, budget)
        if count >= MIN_STEPS and count * TOKENS_PER_STEP <= MAX_TOKENS_PER_PARAM * n:
          add(**({'family': family} if every else {}), size=size, budget=budget)


def analyse(runs):
  """(finished runs, N, D, L, bootstrap fit of the law, IsoFLOP analysis, its warnings)."""
  finished = [r for r in runs if r.final]
  N = np.array([r.final['num_params'] for r in finished], float)
  D = np.array([r.tokens for r in finished], float)
  L = np.array([r.final['eval/loss'] for r in finished])
  fit = scaling.bootstrap(N, D, L)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    budgets = [r.fields['budget'] for r in finished]
    iso = scaling.isoflops(N, scaling.compute_6nd(N, D), L, budget=budgets)
  return finished, N, D, L, fit, iso, caught


def report(runs, plots_dir):
  """A family's law, or with family=all each family's and then their frontiers and
  compute-optimal exponents side by side."""
  by_family: dict[str, list] = {}
  for r in runs:
    by_family.setdefault(r.fields.get('family', ''), []).append(r)
  analyses = {family: analyse(mine) for family, mine in by_family.items()}
  sections = [family_report(family, a, plots_dir) for family, a in analyses.items()]
  if len(analyses) > 1:
    sections.append(comparison(analyses, plots_dir))
  return '\n\n'.join(sections)


def comparison(analyses, plots_dir):
  """The families' loss-against-compute frontiers in one plot, and whether their
  compute-optimal exponents differ beyond their 95% intervals (the intervals do not meet)."""
  laws = {family: (N, D, L, fit.law) for family, (_, N, D, L, fit, _, _) in analyses.items()}
  plots.scaling_frontiers(laws, f'{plots_dir}/scaling_frontiers.png')
  estimates = {}  # (family, method) -> (a, its interval)
  for family, (_, _, _, _, fit, iso, _) in analyses.items():
    estimates[family, 'parametric law'] = (fit.law.a, fit.interval()['a'])
    estimates[family, 'IsoFLOP'] = (iso.n_law.exponent, iso.n_law.interval())
  body = [
    [family, method, f'{a:.3f} [{low:.3f}, {high:.3f}]']
    for (family, method), (a, (low, high)) in estimates.items()
  ]
  verdicts = []
  for method in ('parametric law', 'IsoFLOP'):
    for f1, f2 in itertools.combinations(analyses, 2):
      (a1, (low1, high1)), (a2, (low2, high2)) = estimates[f1, method], estimates[f2, method]
      apart = high1 < low2 or high2 < low1
      verdict = 'differ beyond their intervals' if apart else 'intervals overlap'
      verdicts.append(f'- {method}: {f1} {a1:.3f} against {f2} {a2:.3f}: {verdict}')
  return '\n\n'.join(
    [
      '# The families compared\n\nN* ~ C^a, compute-optimal parameters against compute, '
      'with 95% intervals (D* ~ C^(1-a) under C = 6ND).',
      reports.markdown_table(('family', 'method', 'a [95%]'), body),
      '\n'.join(verdicts),
      '![frontiers](plots/scaling_frontiers.png)',
    ]
  )


def family_report(family, analysis, plots_dir):
  """The parametric law with bootstrap intervals, the IsoFLOP analysis, and both ways to the
  compute-optimal exponents; per run, compute by 6ND and by the model's own count. Headings
  and plots are named by the family when the study holds several."""
  finished, N, D, L, fit, iso, caught = analysis
  law, stderr, interval = fit.law, fit.stderr(), fit.interval()
  title, tag = (f'{family}: ', f'{family}_') if family else ('', '')
  plots.scaling_frontier(N, D, L, law, f'{plots_dir}/{tag}scaling_frontier.png')
  plots.isoflop_profiles(iso, f'{plots_dir}/{tag}scaling_isoflops.png')
  plots.scaling_residuals(N, D, L, law, f'{plots_dir}/{tag}scaling_residuals.png')

  identified = fit.identified()

  def estimate(name: str, value: float) -> list[str]:
    low, high = interval[name]
    shown = f'{value:.4g}' if identified[name] else f'not identified ({value:.2g})'
    return [name, shown, f'{stderr[name]:.3g}', f'[{low:.4g}, {high:.4g}]']

  parametric = reports.markdown_table(
    ('parameter', 'estimate', 'bootstrap sd', '95% interval'),
    [estimate(k, getattr(law, k)) for k in ('E', 'A', 'B', 'alpha', 'beta', 'a', 'b')],
  )
  optimal = reports.markdown_table(
    ('', 'N* ~ C^a', 'D* ~ C^b'),
    [
      [
        'parametric law, closed form: a = beta/(alpha+beta), b = alpha/(alpha+beta)',
        f'{law.a:.3f} [{interval["a"][0]:.3f}, {interval["a"][1]:.3f}]',
        f'{law.b:.3f} [{interval["b"][0]:.3f}, {interval["b"][1]:.3f}]',
      ],
      [
        'IsoFLOP parabolas, power laws in C (OLS 95% intervals)',
        '{:.3f} [{:.3f}, {:.3f}]'.format(iso.n_law.exponent, *iso.n_law.interval()),
        '{:.3f} [{:.3f}, {:.3f}]'.format(iso.d_law.exponent, *iso.d_law.interval()),
      ],
    ],
  )
  budgets = reports.markdown_table(
    ('C (6ND)', 'runs', 'IsoFLOP N*', 'IsoFLOP D*', 'law N*', 'law D*', 'vertex'),
    [
      [
        f'{b.C:.3g}',
        len(b.N),
        f'{b.N_opt:.3g}',
        f'{b.D_opt:.3g}',
        *(f'{x:.3g}' for x in law.optimal(b.C)),
        'extrapolated' if b.extrapolated else 'inside the sizes',
      ]
      for b in iso.budgets
    ],
  )
  per_run = reports.markdown_table(
    ('run', 'N', 'D', 'C = 6ND', 'C exact', 'exact / 6ND', 'eval loss (nats)'),
    [
      [
        r.name,
        f'{n:.3g}',
        f'{d:.3g}',
        f'{r.train_flops_6nd:.3g}',
        f'{r.train_flops:.3g}',
        f'{r.train_flops / r.train_flops_6nd:.3f}',
        f'{loss:.4f}',
      ]
      for r, n, d, loss in zip(finished, N, D, L, strict=True)
    ],
  )
  notes = ''.join(f'\n\nNote: {w.message}' for w in caught)
  return '\n\n'.join(
    [
      f'## {title}Scaling law L(N, D) = E + A / N^alpha + B / D^beta\n\n{len(finished)} runs; '
      'Huber (delta 1e-3) on log loss, L-BFGS from a grid of starts; 200 bootstrap resamples of '
      'the runs. N: every parameter; D: training tokens; L: held-out loss in nats per byte. '
      'A scale whose interval spans more than a factor of 100, or an exponent whose interval '
      'is wider than twice it, is marked "not identified": these runs do not determine it.',
      parametric,
      f'## {title}Compute-optimal allocation\n\n' + optimal + notes,
      budgets,
      f'![loss against compute](plots/{tag}scaling_frontier.png)\n\n'
      f'![IsoFLOP profiles](plots/{tag}scaling_isoflops.png)\n\n'
      f'![residuals](plots/{tag}scaling_residuals.png)',
      f'## {title}Compute per run\n\n' + per_run,
    ]
  )
