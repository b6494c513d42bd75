"""ar_jax.study runs an experiment file's report() as code: a study root copied from elsewhere
must not make it run code of its own, however its sweep.json names the file."""

import json

import pytest

from ar_jax.errors import ConfigError
from ar_jax.studies import reports


def planted_root(tmp_path, experiment: str):
  """A study root whose sweep.json names `experiment`; running it would create ROOT/ran."""
  root = tmp_path / 'root'
  root.mkdir()
  (root / 'sweep.json').write_text(json.dumps({'config': experiment, 'runs': []}))
  return root


def code(tmp_path) -> str:
  return f'open({str(tmp_path / "ran")!r}, "w").close()\n'


def test_a_roots_own_experiment_file_is_not_run(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # the root lies inside the current directory
  root = planted_root(tmp_path, 'root/exp.py')
  (root / 'exp.py').write_text(code(tmp_path))
  with pytest.raises(ConfigError, match=r'inside the study root; .* --experiment=PATH'):
    reports.write_report('root')
  assert not (tmp_path / 'ran').exists()


def test_a_link_to_code_outside_the_current_directory_is_not_run(tmp_path, monkeypatch):
  here = tmp_path / 'project'
  (here / 'experiments').mkdir(parents=True)
  elsewhere = tmp_path / 'elsewhere.py'
  elsewhere.write_text(code(tmp_path))
  (here / 'experiments' / 'exp.py').symlink_to(elsewhere)
  monkeypatch.chdir(here)
  planted_root(here, 'experiments/exp.py')
  with pytest.raises(ConfigError, match=f'outside the current directory {here}'):
    reports.write_report('root')
  assert not (tmp_path / 'ran').exists()
