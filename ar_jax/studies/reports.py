"""A sweep's runs reduced to one table and a report (python -m ar_jax.study --root=DIR).

Reads ROOT/sweep.json (written by launch.sweep) and each run's config.json, metrics.jsonl and
final.json; writes ROOT/study.csv (one row per run), ROOT/report.md and its plots under
ROOT/plots/: final metrics as mean ± sd over seeds ranked best first, learning curves against
tokens and against training FLOPs, throughput, generation speed and memory. An experiment file
may add its own sections with `report(runs, plots_dir) -> markdown` (scaling fits, sampling
tables...), called with the loaded runs.
"""

import csv
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ar_jax import config
from ar_jax.monitor import writers
from ar_jax.studies import plots
from ar_jax.errors import check

# Reported in this order of preference: the unit the data is usually quoted in.
PRIMARY_METRICS = ('eval/bits_per_char', 'eval/bits_per_dim', 'eval/bits_per_byte', 'eval/loss')


@dataclasses.dataclass
class RunRecord:
  """One run of a sweep, as its workdir holds it."""

  name: str
  fields: dict[str, Any]  # what the sweep set for it (add(**fields))
  workdir: str
  config: dict[str, Any]
  history: list[dict[str, float]]  # metrics.jsonl, in order
  final: dict[str, float] | None  # final.json: None until the run has finished

  @property
  def tokens_per_step(self) -> int:
    return self.config['batch_size'] * self.config['data']['seq_len']

  @property
  def tokens(self) -> int:
    """Training tokens of the whole run."""
    return self.config['num_train_steps'] * self.tokens_per_step

  @property
  def train_flops(self) -> float:
    """Exact training FLOPs: 3 x the model's own forward count per token, x tokens."""
    return 3 * self.final['forward_flops_per_token'] * self.tokens if self.final else math.nan

  @property
  def train_flops_6nd(self) -> float:
    """The 6ND convention (N = all parameters, embeddings included)."""
    return 6 * self.final['num_params'] * self.tokens if self.final else math.nan

  @property
  def variant(self) -> str:
    """The run's fields except its seed: runs that differ only by seed share a variant."""
    return ','.join(f'{k}={v}' for k, v in self.fields.items() if k != 'seed') or 'all'

  def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric over the run."""
    points = [(r['step'], r[key]) for r in self.history if key in r]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])

  def median(self, key: str) -> float:
    values = self.series(key)[1]
    return float(np.median(values)) if values.size else math.nan


def manifest(root: str) -> dict[str, Any]:
  """ROOT/sweep.json: the experiment (`config`) and its runs, as launch.sweep expanded them."""
  path = os.path.join(root, 'sweep.json')
  check(os.path.exists(path), f'{root} holds no sweep: {path} is missing')
  with open(path) as f:
    return json.load(f)


def load(root: str) -> list[RunRecord]:
  """The runs of the sweep under root, with what their workdirs hold so far."""
  return [_record(r['name'], r['fields'], r['workdir']) for r in manifest(root)['runs']]


def _record(name: str, fields: dict, workdir: str) -> RunRecord:
  def read_json(file):
    path = os.path.join(workdir, file)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  history = writers.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return RunRecord(
    name, fields, workdir, read_json('config.json') or {}, history, read_json('final.json')
  )


def primary_metric(runs: Sequence[RunRecord]) -> str:
  """The first of PRIMARY_METRICS every finished run reports."""
  finished = [r.final for r in runs if r.final]
  check(bool(finished), 'no run of the sweep has finished yet')
  for key in PRIMARY_METRICS:
    if all(key in f for f in finished):
      return key
  raise AssertionError('every run reports eval/loss')


def rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
  """One flat row per run: its fields, size, compute, final metrics, speeds."""
  out = []
  for r in runs:
    row = {'name': r.name, **r.fields, 'finished': r.final is not None}
    row['model.name'] = r.config.get('model', {}).get('name', '')
    row['tokens'] = r.tokens if r.config else math.nan
    if r.final:
      row['num_params'] = r.final['num_params']
      row['train_flops'] = r.train_flops
      row['train_flops_6nd'] = r.train_flops_6nd
    row['train/tokens_per_sec'] = r.median('train/tokens_per_sec')
    row['train/mfu'] = r.median('train/mfu')
    losses = r.series('train/loss')[1]
    row['train/loss'] = losses[-1] if losses.size else math.nan
    for k, v in (r.final or {}).items():
      if k.startswith(('eval/', 'memory/', 'sample/')):
        row[k] = v
    out.append(row)
  return out


def write_csv(table: list[dict[str, Any]], path: str) -> None:
  columns = list(dict.fromkeys(k for row in table for k in row))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(table)


@dataclasses.dataclass
class Summary:
  """The finished runs of one variant: mean and sd (over seeds) of what they measured."""

  variant: str
  runs: list[RunRecord]

  def stat(self, key: str) -> tuple[float, float]:
    values = np.array([r.final.get(key, math.nan) for r in self.runs])
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan

  def speed(self, key: str) -> float:
    return float(np.median([r.median(key) for r in self.runs]))


def summaries(runs: Sequence[RunRecord], metric: str) -> list[Summary]:
  """One summary per variant, over its finished runs, best mean metric first."""
  by_variant: dict[str, list[RunRecord]] = {}
  for r in runs:
    if r.final:
      by_variant.setdefault(r.variant, []).append(r)
  out = [Summary(v, rs) for v, rs in by_variant.items()]
  return sorted(out, key=lambda s: s.stat(metric)[0])


def pm(mean: float, sd: float, digits: int = 3) -> str:
  return f'{mean:.{digits}f}' if math.isnan(sd) else f'{mean:.{digits}f} ± {sd:.{digits}f}'


def markdown_table(header: Sequence[str], body: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in body]
  return '\n'.join(lines)


def plot_curves(runs: Sequence[RunRecord], metric: str, against: str, path: str):
  """Train loss and the eval metric of every run against tokens or training FLOPs; one style
  per variant, named in a legend beside the axes."""
  from matplotlib import ticker  # here: only the reports need matplotlib

  variants = list(dict.fromkeys(r.variant for r in runs))
  fig = plots.figure(11, max(4, 0.2 * len(variants) + 1))
  ax_train, ax_eval = fig.subplots(1, 2)
  labelled = set()
  for r in runs:
    if not r.history or (against == 'flops' and not r.final):
      continue  # not started yet, or no FLOP count before it has finished
    scale = r.tokens_per_step * (
      3 * r.final['forward_flops_per_token'] if against == 'flops' else 1
    )
    label = None if r.variant in labelled else r.variant  # one legend entry per variant
    labelled.add(r.variant)
    style = plots.style(variants.index(r.variant))
    for ax, key in ((ax_train, 'train/loss'), (ax_eval, metric)):
      steps, values = r.series(key)
      evals = ax is ax_eval  # the legend names the eval curves; the train ones share styles
      ax.plot(
        steps * scale, values, label=label if evals else None, marker='.' if evals else '', **style
      )
  for ax, key in ((ax_train, 'train/loss (nats/token)'), (ax_eval, metric)):
    ax.set_xscale('log')
    # Ticks at 1, 2 and 5 per decade, labelled, and no minor labels: those collide.
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.LogFormatterSciNotation(labelOnlyBase=False))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel('training FLOPs' if against == 'flops' else 'training tokens')
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
  fig.legend(loc='outside right upper', fontsize='small')
  return plots.save(fig, path)


def plot_final(groups: Sequence[Summary], metric: str, path: str):
  """The final metric per variant, best at the top, mean with an sd error bar over seeds."""
  fig = plots.figure(8, 0.3 * len(groups) + 1.5)
  ax = fig.subplots()
  means, sds = zip(*(g.stat(metric) for g in groups), strict=True)
  bars = ax.barh(range(len(groups)), means, xerr=np.nan_to_num(sds), capsize=3)
  ax.bar_label(bars, [pm(m, s) for m, s in zip(means, sds, strict=True)], padding=4, fontsize=8)
  ax.set_yticks(range(len(groups)), [g.variant for g in groups], fontsize=8)
  ax.invert_yaxis()
  ax.set(xlabel=metric, title=f'final {metric}: mean ± sd over seeds')
  low = min(m - np.nan_to_num(s) for m, s in zip(means, sds, strict=True))
  high = max(m + np.nan_to_num(s) for m, s in zip(means, sds, strict=True))
  ax.set_xlim(low - 0.05 * abs(low), high + 0.25 * (high - low) + 1e-9)  # room for the labels
  return plots.save(fig, path)


def write_report(root: str, experiment_path: str | None = None) -> str:
  """ROOT/study.csv, ROOT/report.md and ROOT/plots/*.png; returns the report's path.

  The experiment file's report() runs as code: by default the file sweep.json names, which
  must resolve (links followed) inside the current directory and outside the study root, so
  a study root copied from elsewhere cannot make this run its code; experiment_path names
  the file to run instead.
  """
  config_arg = manifest(root)['config']
  if experiment_path is None:
    experiment_path = config_arg.partition(':')[0]
    real, here = os.path.realpath(experiment_path), os.path.realpath(os.getcwd())
    inside = lambda folder: os.path.commonpath([real, folder]) == folder
    check(
      inside(here) and not inside(os.path.realpath(root)),
      f'{root}/sweep.json names the experiment {experiment_path} ({real}), '
      + ('inside the study root' if inside(here) else f'outside the current directory {here}')
      + '; the report runs its code, so name the file to run explicitly: --experiment=PATH',
    )
  runs = load(root)
  metric = primary_metric(runs)
  plots_dir = os.path.join(root, 'plots')
  os.makedirs(plots_dir, exist_ok=True)
  write_csv(rows(runs), os.path.join(root, 'study.csv'))
  groups = summaries(runs, metric)
  finished = sum(r.final is not None for r in runs)
  body = [
    [
      i + 1,
      g.variant,
      len(g.runs),
      f'{g.stat("num_params")[0] / 1e6:.3g}M',
      f'{np.mean([r.train_flops for r in g.runs]):.3g}',
      pm(*g.stat(metric)),
      f'{g.speed("train/tokens_per_sec"):,.0f}',
      f'{g.stat("sample/tokens_per_sec")[0]:,.0f}',
      f'{g.stat("memory/total_bytes")[0] / 2**20:.3g}',
    ]
    for i, g in enumerate(groups)
  ]
  plot_final(groups, metric, os.path.join(plots_dir, 'final.png'))
  for against in ('tokens', 'flops'):
    plot_curves(runs, metric, against, os.path.join(plots_dir, f'curves_{against}.png'))
  sections = [
    f'# Study: {config_arg}',
    f'{len(runs)} runs ({finished} finished) under `{root}`; every number below is from '
    f'their workdirs, per run in `study.csv`. Regenerate: `python -m ar_jax.study --root={root}`.',
    f'## Final {metric}, best first (mean ± sd over seeds)',
    markdown_table(
      (
        'rank',
        'variant',
        'seeds',
        'params',
        'train FLOPs',
        metric,
        'train tok/s',
        'sample tok/s',
        'train step MiB/device',
      ),
      body,
    ),
    '![final metric](plots/final.png)',
    '## Learning curves',
    '![against tokens](plots/curves_tokens.png)\n\n![against FLOPs](plots/curves_flops.png)',
  ]
  experiment = config.load_experiment(experiment_path)
  if hasattr(experiment, 'report'):
    sections.append(experiment.report(runs, plots_dir))
  path = os.path.join(root, 'report.md')
  with open(path, 'w') as f:
    f.write('\n\n'.join(sections) + '\n')
  return path
