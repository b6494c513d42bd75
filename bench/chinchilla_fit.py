"""The scaling-law fitter on Chinchilla's runs, against Besiroglu et al. (2024).

  python bench/chinchilla_fit.py

Reads ../shared/data/scaling/chinchilla_fig4_svg_extracted.csv (Epoch AI's extraction of
Hoffmann et al.'s figure 4), drops the 5 highest-loss runs, takes D = C / (6 N), fits
L(N, D) = E + A / N^alpha + B / D^beta and bootstraps it (200 resamples); prints the
estimates and standard errors beside the published ones, and the time each took.
"""

import csv
import pathlib
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ar_jax.studies import scaling  # noqa: E402

PUBLISHED = {  # estimate (standard error)
  'E': (1.817, 0.026),
  'A': (482.0, 124.5),
  'B': (2085.4, 1293.3),
  'alpha': (0.3478, 0.0154),
  'beta': (0.3658, 0.0206),
}


def main():
  path = REPO.parent / 'shared' / 'data' / 'scaling' / 'chinchilla_fig4_svg_extracted.csv'
  with path.open() as f:
    rows = list(csv.DictReader(f))
  N, C, L = (np.array([float(r[k]) for r in rows]) for k in ('Model Size', 'Training FLOP', 'loss'))
  keep = np.argsort(L)[:-5]
  N, D, L = N[keep], C[keep] / (6 * N[keep]), L[keep]
  start = time.perf_counter()
  law = scaling.fit_law(N, D, L)
  fit_seconds = time.perf_counter() - start
  start = time.perf_counter()
  stderr = scaling.bootstrap(N, D, L, n_boot=200, seed=0).stderr()
  boot_seconds = time.perf_counter() - start
  print(f'{len(N)} runs; fit {fit_seconds:.1f} s, bootstrap (200 resamples) {boot_seconds:.1f} s')
  print(f'{"":6s} {"ours":>10s} {"(sd)":>9s}   {"published":>10s} {"(se)":>9s}')
  for name, (estimate, se) in PUBLISHED.items():
    print(f'{name:6s} {getattr(law, name):10.4g} {stderr[name]:9.3g}   {estimate:10.4g} {se:9.3g}')
  print(f'a = beta / (alpha + beta) = {law.a:.4f}, b = {law.b:.4f}')


if __name__ == '__main__':
  main()
