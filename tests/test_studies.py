"""The study experiments: models matched as their docstrings say, grids the analyses can fit,
and the sampling study's measurements."""

import sys

import pytest

from ar_jax import models, train
from ar_jax import run as run_lib
from ar_jax import state as state_lib
from experiments import compare_families, sampling, scaling, sizing
from tests import helpers
from tests.helpers import REPO, tiny_config


def declared(module, arg=None) -> list[dict]:
  runs = []
  module.sweep(lambda **fields: runs.append(fields), arg)
  return runs


@pytest.mark.parametrize('match, which', [('params', 0), ('flops', 1)])
def test_families_are_matched_to_the_transformer(match, which):
  seq_len = 64
  reference = models.size(compare_families.get_config('model=transformer').model, 65, seq_len)
  for model in compare_families.CHOICES['model'][1:]:
    c = compare_families.get_config(f'model={model},match={match}')
    assert models.size(c.model, 65, seq_len)[which] == pytest.approx(reference[which], rel=0.01)
  runs = declared(compare_families)
  assert len(runs) == 3 * (10 + 9)  # the transformer is the reference of both matchings
  assert {r['seed'] for r in runs} == {0, 1, 2}


def test_a_solved_width_is_the_nearest_to_its_target():
  """The quadratic guess and the bisection beside it land on the best width, also for targets
  far from the probes' sizes and beyond the largest width."""
  model = compare_families.get_config('model=lstm,steps=8').model

  def size(width):
    sizing.set_width(model, width)
    return models.size(model, 65, 64)[0]

  for target in (2e3, 8e5, 1e12):
    sizing.match_width(model, target, 0, 65, 64)
    width = model.d_hidden
    neighbours = [w for w in (width - 1, width, width + 1) if 1 <= w <= sizing.MAX_WIDTH]
    errors = {w: abs(size(w) - target) for w in neighbours}
    assert errors[width] == min(errors.values()), (target, errors)
  assert width == sizing.MAX_WIDTH


# Solving a recurrent family's widths takes seconds: the medium grid is checked at the
# transformer's sizes, the recurrent widths on the small grid.
@pytest.mark.parametrize('grid, family', [('small', 'lstm'), ('medium', 'transformer')])
def test_scaling_grid_spends_each_budget_with_at_least_three_sizes(grid, family):
  runs = declared(scaling, f'grid={grid},family={family}')
  for budget in {r['budget'] for r in runs}:
    sizes = [r['size'] for r in runs if r['budget'] == budget]
    assert len(sizes) >= 3, (budget, sizes)
    for size in sizes:
      c = scaling.get_config(f'family={family},size={size},budget={budget}')
      n = models.size(c.model, scaling.VOCAB, c.data.seq_len)[0]
      tokens = c.num_train_steps * c.batch_size * c.data.seq_len
      assert c.num_train_steps >= scaling.MIN_STEPS
      assert tokens <= scaling.MAX_TOKENS_PER_PARAM * n
      assert 6 * n * tokens == pytest.approx(float(budget), rel=0.05)


def test_sampling_study_measures_each_strategy(text_file, tmp_path):
  cfg = tiny_config(text_file)
  run = run_lib.setup(cfg, str(tmp_path))
  _, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, cfg)
  params = train.init_state(run, shardings).params
  prompts = sampling.prompts_from(text_file.read_text(), 6, 8)
  assert len({len(p) for p in prompts}) == 1 and all(p in text_file.read_text() for p in prompts)
  rows = {r['strategy']: r for r in sampling.measure(run.model, params, run.tokenizer, prompts, 16)}
  assert list(rows) == list(sampling.STRATEGIES)
  # Greedy and beam search pick likely tokens: the model finds them likelier than its samples.
  assert rows['greedy']['perplexity'] < rows['T=1.3']['perplexity']
  assert rows['beam=4']['perplexity'] < rows['T=1.3']['perplexity']
  assert rows['T=1.3']['distinct-2'] >= rows['greedy']['distinct-2']
  assert all(0 <= r['self-BLEU'] <= 100 and 0 <= r['rep-4'] <= 1 for r in rows.values())


def test_every_experiment_file_loads_beside_the_entry_points_flags():
  """Experiment files are loaded inside ar_jax.main (by its --config flag): one that
  imports a module defining absl flags of the same name breaks them all."""
  script = (
    'import glob, ar_jax.main\n'
    'from ar_jax.config import load_experiment\n'
    "for path in sorted(glob.glob('experiments/[!_]*.py')):\n"
    '  load_experiment(path)\n'
  )
  result = helpers.run([sys.executable, '-c', script], cwd=REPO, timeout=120)
  assert result.returncode == 0, result.stderr
