"""Figures written to PNG files, for the study reports.

matplotlib's Figure draws on its own Agg canvas: no pyplot, no global backend, no display
(clusters and CI have none), and nothing for a caller to close.
"""

import pathlib

import numpy as np

from ar_jax.studies import scaling


def figure(width: float = 6.0, height: float = 4.5):
  from matplotlib.figure import Figure  # here: only the reports need matplotlib

  return Figure(figsize=(width, height), layout='constrained')


def style(i: int) -> dict:
  """The i-th of 40 curve styles told apart by colour and line: ten colours, then dashed..."""
  from matplotlib import colormaps

  return {'color': colormaps['tab10'](i % 10), 'linestyle': ('-', '--', ':', '-.')[i // 10 % 4]}


def save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  fig.savefig(path, dpi=120)
  return path


def scaling_frontier(N, D, L, law: scaling.Law, path) -> pathlib.Path:
  """Loss against compute 6ND for every run, and the law's compute-optimal frontier."""
  C = scaling.compute_6nd(N, D)
  fig = figure()
  ax = fig.add_subplot()
  points = ax.scatter(C, L, c=np.log10(N), s=12, cmap='viridis')
  fig.colorbar(points, ax=ax, label='log10 N')
  grid = np.geomspace(C.min(), C.max(), 200)
  ax.plot(grid, law.frontier(grid), 'k-', label=f'frontier: N* ~ C^{law.a:.3f}')
  ax.set(xscale='log', xlabel='compute C = 6ND (FLOPs)', ylabel='loss')
  ax.legend()
  return save(fig, path)


def scaling_frontiers(laws: dict, path) -> pathlib.Path:
  """Loss against compute 6ND, runs and compute-optimal frontier, of each family's
  (N, D, L, law) in `laws`, on one plot."""
  fig = figure()
  ax = fig.add_subplot()
  for i, (family, (N, D, L, law)) in enumerate(laws.items()):
    C = scaling.compute_6nd(N, D)
    grid = np.geomspace(C.min(), C.max(), 200)
    color = style(i)['color']
    ax.scatter(C, L, s=10, color=color, alpha=0.5)
    ax.plot(grid, law.frontier(grid), '-', color=color, label=f'{family}: N* ~ C^{law.a:.3f}')
  ax.set(xscale='log', xlabel='compute C = 6ND (FLOPs)', ylabel='loss')
  ax.legend()
  return save(fig, path)


def isoflop_profiles(iso: scaling.IsoFlops, path) -> pathlib.Path:
  """Loss against N for each budget, its parabola in log N, and the parabola's minimum."""
  fig = figure()
  ax = fig.add_subplot()
  for b in iso.budgets:
    (line,) = ax.plot(b.N, b.L, 'o', ms=4, label=f'C = {b.C:.2g}')
    if not b.has_minimum:
      continue
    # Out to the vertex when it lies beyond the sampled sizes, so that the marker sits on a curve.
    x_opt = np.log(b.N_opt)
    x = np.linspace(min(np.log(b.N.min()), x_opt), max(np.log(b.N.max()), x_opt), 100)
    ax.plot(np.exp(x), np.polyval(b.coeffs, x), '-', color=line.get_color())
    ax.plot(b.N_opt, b.L_opt, 'x' if b.extrapolated else '*', color='k', ms=9)
  ax.set(xscale='log', xlabel='parameters N', ylabel='loss', title='IsoFLOP profiles')
  ax.legend(fontsize='small')
  return save(fig, path)


def scaling_residuals(N, D, L, law: scaling.Law, path) -> pathlib.Path:
  """log observed - log predicted loss against N and against compute."""
  N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
  r = np.log(L) - np.log(law.predict(N, D))
  fig = figure()
  for i, (x, label) in enumerate([(N, 'parameters N'), (scaling.compute_6nd(N, D), 'compute 6ND')]):
    ax = fig.add_subplot(1, 2, i + 1, sharey=fig.axes[0] if i else None)
    ax.axhline(0, color='k', lw=0.8)
    ax.scatter(x, r, s=10)
    ax.set(xscale='log', xlabel=label)
  fig.axes[0].set_ylabel('log L - log L_fit')
  return save(fig, path)
