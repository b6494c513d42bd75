"""Figures written to PNG files, for the study reports.

matplotlib's Figure draws on its own Agg canvas: no pyplot, no global backend, no display
(clusters and CI have none), and nothing for a caller to close.
"""

import pathlib


def figure(width: float = 6.0, height: float = 4.5):
  from matplotlib.figure import Figure  # here: only the reports need matplotlib

  return Figure(figsize=(width, height), layout='constrained')


def save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  fig.savefig(path, dpi=120)
  return path
