"""The small scaling study end to end: sweep, report, and the fitted exponents.

  python bench/scaling_study.py [--root=DIR] [--arg=grid=small]

Runs `launch.sweep` (local runner) and `ar_jax.study` as a user would, then prints the wall
time and the compute-optimal exponents (N* ~ C^a, D* ~ C^b) with their 95% intervals, from
the parametric law (bootstrap) and from the IsoFLOP parabolas (OLS). A root that already
holds finished runs is reused: only what is missing runs (and is timed).
"""

import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ar_jax.studies import reports  # noqa: E402
from experiments import scaling  # noqa: E402

flags.DEFINE_string('root', None, 'Where the runs go (default: a temporary directory).')
flags.DEFINE_string('arg', 'grid=small', 'The arg of experiments/scaling.py.')


def main(argv):
  del argv
  f = flags.FLAGS
  root = f.root or tempfile.mkdtemp(prefix='scaling_study_')
  config = f'--config=experiments/scaling.py:{f.arg}'
  start = time.perf_counter()
  for command in (
    ['launch.sweep', config, f'--root={root}', '--runner=local'],
    ['ar_jax.study', f'--root={root}'],
  ):
    subprocess.run([sys.executable, '-m', *command], cwd=REPO, check=True)
  wall = time.perf_counter() - start
  finished, *_, fit, iso, caught = scaling.analyse(reports.load(root))
  interval = fit.interval()
  print(f'\n{len(finished)} runs, sweep + report in {wall / 60:.1f} min; report: {root}/report.md')
  law = fit.law
  print(f'law: E={law.E:.3f} A={law.A:.4g} B={law.B:.4g} alpha={law.alpha:.3f} beta={law.beta:.3f}')
  unidentified = [k for k, ok in fit.identified().items() if not ok]
  if unidentified:
    print(f'not identified by these runs (95% intervals too wide): {", ".join(unidentified)}')
  for name, value, (low, high) in (
    ('a (law)', law.a, interval['a']),
    ('b (law)', law.b, interval['b']),
    ('a (IsoFLOP)', iso.n_law.exponent, iso.n_law.interval()),
    ('b (IsoFLOP)', iso.d_law.exponent, iso.d_law.interval()),
  ):
    print(f'{name:12s} {value:.3f}  95% [{low:.3f}, {high:.3f}]')
  for warning in caught:
    print(f'note: {warning.message}')


if __name__ == '__main__':
  app.run(main)
