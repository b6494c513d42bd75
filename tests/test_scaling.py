"""Scaling-law fits: Chinchilla's published estimates, synthetic laws, IsoFLOPs and the plots."""

import csv
import dataclasses

import numpy as np
import pytest

from ar_jax.studies import plots, scaling
from experiments import scaling as scaling_study

# Besiroglu et al. (2024), table 1: (estimate, standard error) of their Approach 3 replication.
BESIROGLU = {
  'A': (482.0, 124.5),
  'B': (2085.4, 1293.3),
  'E': (1.817, 0.026),
  'alpha': (0.3478, 0.0154),
  'beta': (0.3658, 0.0206),
}
TRUTH = scaling.Law(E=1.7, A=400.0, B=1500.0, alpha=0.34, beta=0.28)


def chinchilla_runs(shared_data):
  """(N, D, L) of the Chinchilla runs read off their figure 4, less the 5 highest losses."""
  path = shared_data / 'scaling' / 'chinchilla_fig4_svg_extracted.csv'
  if not path.is_file():
    pytest.skip(f'Chinchilla runs not found at {path}')
  with path.open() as f:
    rows = list(csv.DictReader(f))
  N, C, L = (np.array([float(r[k]) for r in rows]) for k in ('Model Size', 'Training FLOP', 'loss'))
  # Besiroglu et al. drop the five highest-loss runs as outliers.
  keep = np.argsort(L)[:-5]
  return N[keep], C[keep] / (6 * N[keep]), L[keep]


def test_chinchilla_fit_lies_within_the_published_standard_errors(shared_data):
  N, D, L = chinchilla_runs(shared_data)
  assert len(N) == 240
  law = scaling.fit_law(N, D, L)
  for name, (estimate, stderr) in BESIROGLU.items():
    assert abs(getattr(law, name) - estimate) < stderr, name
  # Besiroglu et al.'s own grid search lands here; the screened grid finds the same optimum.
  reference = {'E': 1.8172, 'A': 477.8, 'B': 2143.9, 'alpha': 0.3473, 'beta': 0.3672}
  assert dataclasses.asdict(law) == pytest.approx(reference, rel=2e-3)


def test_chinchilla_bootstrap_errors_are_near_the_published_ones(shared_data):
  fit = scaling.bootstrap(*chinchilla_runs(shared_data), n_boot=60, seed=0)
  stderr = fit.stderr()
  for name, (_, published) in BESIROGLU.items():
    assert published / 2 < stderr[name] < 2 * published, name
  # a + b = 1 in every resample, so the two exponents' errors agree.
  assert stderr['a'] == pytest.approx(stderr['b'])
  lo, hi = fit.interval(0.95)['a']
  assert lo < fit.law.a < hi


def test_gradient_matches_central_differences(shared_data):
  N, D, L = chinchilla_runs(shared_data)
  logs = (np.log(N), np.log(D), np.log(L))
  # A point near the optimum, where most residuals sit inside the Huber region, and two far off.
  points = np.array([[6.2, 7.7, 0.6, 0.35, 0.37], [5.0, 9.0, 0.3, 0.5, 0.2], [15, 0, 0.5, 1, 0]])
  _, grad = scaling._objective(points, *logs, 1e-3)
  h = 1e-6
  for p, g in zip(points, grad, strict=True):
    steps = h * np.eye(5)
    plus, _ = scaling._objective(p + steps, *logs, 1e-3)
    minus, _ = scaling._objective(p - steps, *logs, 1e-3)
    np.testing.assert_allclose(g, (plus - minus) / (2 * h), rtol=1e-4, atol=1e-9)


def synthetic_runs(seed=0, sd=0.005):
  """An 8 x 8 grid of N and D, each over 4 decades, losses with lognormal noise."""
  N, D = (x.ravel() for x in np.meshgrid(np.geomspace(1e7, 1e11, 8), np.geomspace(1e9, 1e13, 8)))
  rng = np.random.default_rng(seed)
  return N, D, TRUTH.predict(N, D) * np.exp(sd * rng.standard_normal(N.shape))


def test_synthetic_law_is_recovered_and_bootstrap_covers_the_truth():
  N, D, L = synthetic_runs()
  fit = scaling.bootstrap(N, D, L, n_boot=40, seed=1)
  law = fit.law
  assert law.alpha == pytest.approx(TRUTH.alpha, abs=0.03)
  assert law.beta == pytest.approx(TRUTH.beta, abs=0.03)
  assert law.a == pytest.approx(TRUTH.a, abs=0.02)
  # E, A and B trade off against each other and are known less well than the exponents.
  assert abs(law.E - TRUTH.E) < 0.1
  assert abs(law.A / TRUTH.A - 1) < 0.3
  assert abs(law.B / TRUTH.B - 1) < 0.3
  interval = fit.interval(0.95)
  for name in ('alpha', 'beta', 'E'):
    lo, hi = interval[name]
    assert lo < getattr(TRUTH, name) < hi, name
  lo, hi = interval['alpha']
  # The interval is informative, not the whole plausible range.
  assert hi - lo < 0.1
  assert fit.samples['alpha'].shape == (40,)
  assert all(fit.identified().values())


def test_an_irreducible_loss_the_runs_cannot_see_is_reported_unidentified():
  """Runs far from the floor (E is 1e-4 of the loss) leave E free to run off to 0."""
  N, D, _ = synthetic_runs()
  truth = scaling.Law(E=1e-4, A=TRUTH.A, B=TRUTH.B, alpha=TRUTH.alpha, beta=TRUTH.beta)
  L = truth.predict(N, D) * np.exp(0.005 * np.random.default_rng(0).standard_normal(N.shape))
  identified = scaling.bootstrap(N, D, L, n_boot=20, seed=1).identified()
  assert not identified['E']
  assert identified['alpha'] and identified['beta']


def test_optimal_is_on_the_iso_compute_line_and_minimises_the_loss_along_it():
  C = np.array([1e18, 1e21, 1e24])
  N_opt, D_opt = TRUTH.optimal(C)
  np.testing.assert_allclose(6 * N_opt * D_opt, C, rtol=1e-12)
  for c, n_opt in zip(C, N_opt, strict=True):
    N = np.geomspace(n_opt / 100, n_opt * 100, 200_001)
    dense = N[np.argmin(TRUTH.predict(N, c / (6 * N)))]
    assert n_opt == pytest.approx(dense, rel=1e-4)
  # The frontier is the loss at the optimum and falls with compute.
  np.testing.assert_allclose(TRUTH.frontier(C), TRUTH.predict(N_opt, D_opt))
  assert np.all(np.diff(TRUTH.frontier(C)) < 0)
  assert scaling.compute_6nd(N_opt, D_opt) == pytest.approx(C)


def isoflop_runs(seed=0, law=TRUTH):
  """6 sizes per budget at 5 budgets, centred off the optimum by up to a factor 1.5 either way."""
  rng = np.random.default_rng(seed)
  budgets = np.geomspace(1e18, 1e22, 5)
  N, C = [], []
  for c in budgets:
    n_opt, _ = law.optimal(c)
    sizes = n_opt * np.exp(rng.uniform(-0.4, 0.4)) * np.geomspace(1 / 8, 8, 6)
    N.append(sizes)
    # Each run's exact compute differs a little from the budget's nominal 6ND.
    C.append(c * rng.uniform(0.98, 1.02, sizes.shape))
  N, C = np.concatenate(N), np.concatenate(C)
  L = law.predict(N, C / (6 * N)) * np.exp(0.001 * rng.standard_normal(N.shape))
  return N, C, L, np.repeat(budgets, 6)


def test_isoflops_recover_the_compute_optimal_sizes_and_exponents():
  N, C, L, labels = isoflop_runs()
  iso = scaling.isoflops(N, C, L)
  assert len(iso.budgets) == 5
  for b in iso.budgets:
    assert not b.extrapolated
    n_opt, _ = TRUTH.optimal(b.C)
    assert b.N_opt == pytest.approx(n_opt, rel=0.1)
    assert b.D_opt == pytest.approx(b.C / (6 * b.N_opt))
  assert iso.n_law.exponent == pytest.approx(TRUTH.a, abs=0.02)
  assert iso.d_law.exponent == pytest.approx(TRUTH.b, abs=0.02)
  lo, hi = iso.n_law.interval(0.95)
  assert lo < TRUTH.a < hi
  # Explicit labels group the runs the same way as closeness of their compute.
  by_label = scaling.isoflops(N, C, L, budget=[f'{c:.0e}' for c in labels])
  assert [b.N_opt for b in by_label.budgets] == pytest.approx([b.N_opt for b in iso.budgets])


def test_isoflops_flag_a_vertex_outside_the_sampled_sizes():
  N, C, L, _ = isoflop_runs()
  # Every size of the largest budget above its optimum: the vertex is extrapolated.
  n_opt, _ = TRUTH.optimal(1e22)
  N[-6:] = n_opt * np.geomspace(3, 30, 6)
  L[-6:] = TRUTH.predict(N[-6:], C[-6:] / (6 * N[-6:]))
  with pytest.warns(UserWarning, match='extrapolated'):
    iso = scaling.isoflops(N, C, L)
  assert [b.extrapolated for b in iso.budgets] == [False] * 4 + [True]


def test_isoflops_leave_a_budget_without_a_minimum_out_of_the_power_laws():
  N, C, L, _ = isoflop_runs()
  # The smallest budget's losses turned upside down: concave in log N, no vertex.
  L[:6] = 2 * L[:6].mean() - L[:6]
  with pytest.warns(UserWarning, match='no minimum'):
    iso = scaling.isoflops(N, C, L)
  assert [b.has_minimum for b in iso.budgets] == [False] + [True] * 4
  assert np.isnan(iso.budgets[0].N_opt) and not iso.budgets[0].extrapolated
  rest = scaling.isoflops(N[6:], C[6:], L[6:])
  assert iso.n_law.exponent == pytest.approx(rest.n_law.exponent)
  # With two budgets left that have a vertex, there is no power law with errors.
  with pytest.raises(ValueError, match='got 2 of 3'), pytest.warns(UserWarning, match='no minimum'):
    scaling.isoflops(N[:18], C[:18], L[:18])


def test_isoflops_reject_a_budget_with_fewer_than_three_sizes():
  N, C, L, _ = isoflop_runs()
  N[:6] = np.repeat(N[:2], 3)
  with pytest.raises(ValueError, match='at least 3'):
    scaling.isoflops(N, C, L)
  with pytest.raises(ValueError, match='one label per run'):
    scaling.isoflops(N, C, L, budget=[1, 2])


def test_fit_rejects_bad_inputs():
  N, D, L = synthetic_runs()
  with pytest.raises(ValueError, match='L must be finite and positive'):
    scaling.fit_law(N, D, -L)
  with pytest.raises(ValueError, match='equal lengths'):
    scaling.fit_law(N, D[:-1], L)
  with pytest.raises(ValueError, match='grid must have exactly the keys'):
    scaling.fit_law(N, D, L, grid={'alpha': [0.5]})


def test_plots_write_pngs(tmp_path):
  N, D, L = synthetic_runs()
  iso = scaling.isoflops(*isoflop_runs()[:3])
  paths = [
    plots.scaling_frontier(N, D, L, TRUTH, tmp_path / 'frontier.png'),
    plots.isoflop_profiles(iso, tmp_path / 'isoflops.png'),
    plots.scaling_residuals(N, D, L, TRUTH, tmp_path / 'residuals.png'),
    plots.scaling_frontiers(
      {'a': (N, D, L, TRUTH), 'b': (N, D, L * 1.1, TRUTH)}, tmp_path / 'f.png'
    ),
  ]
  for path in paths:
    data = path.read_bytes()
    assert data.startswith(b'\x89PNG\r\n\x1a\n') and len(data) > 5000, path


def test_the_study_tells_families_whose_exponents_differ_from_those_it_cannot(tmp_path):
  """Three families' runs: two from one law (different noise), one from a law whose
  compute-optimal exponent a = beta / (alpha + beta) is 0.29 against 0.45."""
  steep = scaling.Law(E=1.7, A=400.0, B=1500.0, alpha=0.5, beta=0.2)
  analyses = {}
  for family, seed, law in [('x', 0, TRUTH), ('y', 1, TRUTH), ('z', 2, steep)]:
    N, C, L, labels = isoflop_runs(seed, law)
    D = C / (6 * N)
    fit = scaling.bootstrap(N, D, L, n_boot=20, seed=seed)
    analyses[family] = ([], N, D, L, fit, scaling.isoflops(N, C, L, budget=list(labels)), [])
  text = scaling_study.comparison(analyses, tmp_path)
  for method in ('parametric law', 'IsoFLOP'):
    assert f'{method}: x 0.4' in text
    lines = [line for line in text.splitlines() if line.startswith(f'- {method}:')]
    assert [line.endswith('intervals overlap') for line in lines] == [True, False, False], lines
  assert (tmp_path / 'scaling_frontiers.png').stat().st_size > 5000
