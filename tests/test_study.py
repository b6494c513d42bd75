"""Sweeps (launch/sweep.py) and study reports (ar_jax/studies/reports.py), end to end."""

import csv
import json
import os
import pathlib
import re
import shutil
import sys

import pytest

from ar_jax.errors import ConfigError
from ar_jax.studies import reports
from launch import sweep
from tests import helpers
from tests.helpers import REPO

STUDY = 'tests/tiny_study.py'
PNG = b'\x89PNG\r\n\x1a\n'


@pytest.fixture
def corpus(text_file, monkeypatch):
  monkeypatch.setenv('AR_JAX_TEST_CORPUS', str(text_file))
  return text_file


def cli(module, *flags):
  return helpers.run([sys.executable, '-m', module, *flags], cwd=REPO, timeout=600)


def launch(root, *flags):
  return cli('launch.sweep', f'--config={STUDY}', f'--root={root}', *flags)


def test_expansion_is_deterministic_and_splits_args_from_overrides(corpus, tmp_path):
  first = sweep.expand(STUDY, str(tmp_path))
  again = sweep.expand(STUDY, str(tmp_path))
  assert [r.command(STUDY) for r in first] == [r.command(STUDY) for r in again]
  assert [r.name for r in first] == [
    'width-16_seed-1_num_train_steps-4',
    'width-32_seed-1_num_train_steps-4',
  ]
  # width is the experiment's arg key; seed and num_train_steps are config leaves.
  assert first[1].command(STUDY)[3:] == [
    f'--config={STUDY}:width=32',
    f'--workdir={tmp_path}/width-32_seed-1_num_train_steps-4',
    '--config.seed=1',
    '--config.num_train_steps=4',
  ]


@pytest.mark.parametrize(
  'fields, message',
  [
    ({'width': '24'}, "width='24'; allowed: 16, 32"),  # the experiment's arg refuses it
    ({'seed': 'one'}, 'sweep run seed-one'),  # a config leaf of another type
    ({'widht': '16'}, 'widht'),  # neither a leaf nor an arg key
  ],
)
def test_a_bad_run_fails_the_whole_expansion(corpus, tmp_path, monkeypatch, fields, message):
  module = sweep.load_experiment(STUDY)
  monkeypatch.setattr(sweep, 'load_experiment', lambda path: module)
  monkeypatch.setattr(module, 'sweep', lambda add, arg: (add(width='16'), add(**fields)))
  with pytest.raises(ConfigError, match=message):
    sweep.expand(STUDY, str(tmp_path))


def test_a_run_declared_twice_is_refused(corpus, tmp_path, monkeypatch):
  module = sweep.load_experiment(STUDY)
  monkeypatch.setattr(sweep, 'load_experiment', lambda path: module)
  monkeypatch.setattr(module, 'sweep', lambda add, arg: (add(width='16'), add(width='16')))
  with pytest.raises(ConfigError, match='more than once: width-16'):
    sweep.expand(STUDY, str(tmp_path))


def test_print_and_slurm_runners_list_the_unfinished_runs(corpus, tmp_path):
  printed = launch(tmp_path, '--runner=print')
  assert printed.returncode == 0, printed.stderr
  commands = printed.stdout.splitlines()
  assert len(commands) == 2 and all(c.startswith('python -m ar_jax.main') for c in commands)
  slurm = launch(tmp_path, '--runner=slurm', '--parallel=3')
  assert slurm.returncode == 0, slurm.stderr
  script = (tmp_path / 'sweep.sbatch').read_text()
  assert '#SBATCH --array=0-1%3' in script
  assert (tmp_path / 'sweep_commands.txt').read_text().splitlines() == commands


@pytest.mark.slow
def test_tiny_study_end_to_end(corpus, tmp_path):
  root = tmp_path / 'study'
  first = launch(root)
  assert first.returncode == 0, first.stdout + first.stderr
  names = [r['name'] for r in json.loads((root / 'sweep.json').read_text())['runs']]
  # Progress: runs done of all, elapsed and what is left.
  done = [ln for ln in first.stdout.splitlines() if ln.startswith('done')]
  assert [re.search(r'\| (\d/\d) runs \| elapsed \S+ \| eta ', ln)[1] for ln in done] == [
    '1/2',
    '2/2',
  ]
  assert done[-1].endswith('eta 0m00s')
  finals = {n: json.loads((root / n / 'final.json').read_text()) for n in names}
  assert all(f['step'] == 4 for f in finals.values())

  # Idempotent: nothing finished runs again.
  stamps = {n: os.stat(root / n / 'final.json').st_mtime_ns for n in names}
  again = launch(root)
  assert again.returncode == 0 and '2 finished, 0 to run' in again.stderr, again.stderr
  assert 'start' not in again.stdout
  assert stamps == {n: os.stat(root / n / 'final.json').st_mtime_ns for n in names}

  # An unfinished run (final.json is written last) is resumed from its checkpoint.
  (root / names[0] / 'final.json').unlink()
  resumed = launch(root)
  assert resumed.returncode == 0 and f'start  {names[0]}' in resumed.stdout, resumed.stdout
  assert f'start  {names[1]}' not in resumed.stdout
  assert 'resumed from the checkpoint at step 4' in (root / 'logs' / f'{names[0]}.log').read_text()
  rewritten = json.loads((root / names[0] / 'final.json').read_text())
  assert rewritten['eval/loss'] == pytest.approx(finals[names[0]]['eval/loss'])
  assert rewritten['memory/total_bytes'] == finals[names[0]]['memory/total_bytes'] > 0

  report = cli('ar_jax.study', f'--root={root}')
  assert report.returncode == 0, report.stderr
  with open(root / 'study.csv') as f:
    table = {row['name']: row for row in csv.DictReader(f)}
  assert set(table) == set(names)
  for name, final in finals.items():
    assert float(table[name]['eval/bits_per_char']) == pytest.approx(final['eval/bits_per_char'])
    assert int(table[name]['num_params']) == final['num_params']
    assert float(table[name]['train_flops']) == 3 * final['forward_flops_per_token'] * 4 * 8 * 16
  text = (root / 'report.md').read_text()
  ranked = sorted(finals, key=lambda n: finals[n]['eval/bits_per_char'])
  best = f'| 1 | width={ranked[0].split("_")[0].split("-")[1]},num_train_steps=4 | 1 |'
  assert best in text
  assert '## Parameters by width' in text  # the experiment's own section
  for plot in ('final.png', 'curves_tokens.png', 'curves_flops.png'):
    assert (root / 'plots' / plot).read_bytes().startswith(PNG)
    assert f'plots/{plot}' in text

  # A study run in parts reports what has finished while other runs have not started.
  shutil.rmtree(root / names[1])
  report = reports.write_report(str(root), str(REPO / STUDY))
  assert '2 runs (1 finished)' in pathlib.Path(report).read_text()


def test_study_of_a_root_without_a_sweep_says_so(tmp_path):
  result = cli('ar_jax.study', f'--root={tmp_path}')
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
    f'error: {tmp_path} holds no sweep: {tmp_path}/sweep.json is missing'
  )


def test_a_study_root_naming_an_experiment_elsewhere_does_not_run_it(tmp_path):
  # A copied study root whose sweep.json names code outside this project: reading its report
  # must not execute that file unless the user names it.
  planted = tmp_path / 'planted.py'
  planted.write_text(f'open({str(tmp_path / "ran")!r}, "w").close()\n')
  (tmp_path / 'sweep.json').write_text(json.dumps({'config': str(planted), 'runs': []}))
  result = cli('ar_jax.study', f'--root={tmp_path}')
  assert result.returncode != 0 and 'Traceback' not in result.stderr
  assert 'outside the current directory' in result.stderr and '--experiment=PATH' in result.stderr
  assert not (tmp_path / 'ran').exists()
