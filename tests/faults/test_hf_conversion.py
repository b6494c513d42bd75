"""python -m ar_jax.convert with bad input and faults: an export never overwrites a folder it
was not told to (and never a workdir), writes whole or not at all; an import checks the
config's sizes against the weights before it builds anything; every refusal is one line."""

import json
import os
import shutil
import sys
import time

import pytest

from ar_jax.errors import ConfigError
from ar_jax.interop import hf
from tests.faults.runner import one_line_error, run_command, sample_command
from tests.helpers import run, subprocess_env
from tests.test_convert import experiment, write_hf_dir

CONVERT = [sys.executable, '-m', 'ar_jax.convert']


@pytest.fixture(scope='module')
def tokenizer():
  from ar_jax.data import subword

  return subword.train_bpe(iter(['def f(x):\n    return x + 1\n' * 40]), 280)


@pytest.fixture(scope='module')
def imported(tokenizer, tmp_path_factory):
  """(an HF directory, the run imported from it)."""
  root = tmp_path_factory.mktemp('imported')
  source = write_hf_dir(root / 'hf', tokenizer)
  hf.import_run(str(source), experiment(source), str(root / 'run'))
  return source, root / 'run'


def files(folder):
  return {str(p): p.read_bytes() for p in sorted(folder.rglob('*')) if p.is_file()}


def test_an_export_refuses_a_folder_that_is_not_empty_unless_told(imported, tokenizer, tmp_path):
  _, run_dir = imported
  other = write_hf_dir(tmp_path / 'other', tokenizer, config={'n_layer': 1}, tensors={})
  before = files(other)
  out = run_command([*CONVERT, f'--to_hf={other}', f'--workdir={run_dir}'], check=False)
  one_line_error(out)
  assert f'--to_hf={other} is not empty' in out.stderr and '--overwrite' in out.stderr
  assert files(other) == before
  run_command([*CONVERT, f'--to_hf={other}', f'--workdir={run_dir}', '--overwrite'])
  assert json.loads((other / 'config.json').read_text())['n_layer'] == 2
  assert sorted(os.listdir(tmp_path)) == ['other']  # no temporary or old folder left


def test_an_export_never_writes_into_a_workdir(imported, tmp_path):
  _, original = imported
  run_dir = tmp_path / 'run'
  shutil.copytree(original, run_dir)
  before = files(run_dir)
  out = run_command(
    [*CONVERT, f'--to_hf={run_dir}', f'--workdir={run_dir}', '--overwrite'], check=False
  )
  one_line_error(out)
  assert 'is a run directory (a workdir): an export never writes into one' in out.stderr
  assert files(run_dir) == before
  run_command(sample_command(run_dir, '--prompt=def', '--max_new_tokens=4'))


def test_export_targets_that_cannot_be_written_are_one_line(imported, tmp_path):
  _, run_dir = imported
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(ConfigError, match='is a file; name a folder'):
    hf.export_run(str(run_dir), str(tmp_path / 'a_file'))
  with pytest.raises(ConfigError, match='writing .*/a_file/out failed'):
    hf.export_run(str(run_dir), str(tmp_path / 'a_file' / 'out'))


@pytest.mark.parametrize('options, reason', [('size=64k', 'No space left'), ('ro', 'Read-only')])
def test_an_export_onto_a_full_or_read_only_disk_leaves_nothing(
  imported, tmp_path, small_filesystem, options, reason
):
  _, run_dir = imported
  with small_filesystem(tmp_path / 'disk', options) as disk:
    with pytest.raises(ConfigError, match=f'writing {disk}/out failed \\(.*{reason}'):
      hf.export_run(str(run_dir), str(disk / 'out'))
    assert os.listdir(disk) == []


def test_an_import_checks_sizes_before_it_builds_a_model(tokenizer, tmp_path):
  for name, change, message in [
    ('layers', {'n_layer': 1_000_000_000}, 'n_layer=1000000000; the weights hold 2 layers'),
    ('wide', {'n_embd': 2**20, 'n_head': 4}, r'wte.weight has shape \(\d+, 32\); config.json'),
    ('no_layers', {'n_layer': 'two'}, "n_layer='two'; it must be a positive integer"),
  ]:
    source = write_hf_dir(tmp_path / name, tokenizer, config=change)
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
      hf.import_run(str(source), hf.experiment_config(str(source)), str(tmp_path / f'{name}_run'))
    assert time.perf_counter() - started < 10
    assert not (tmp_path / f'{name}_run').exists()


def test_damaged_hf_files_are_one_line(tokenizer, tmp_path):
  source = write_hf_dir(tmp_path / 'hf', tokenizer)
  weights = source / 'model.safetensors'
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
  with pytest.raises(ConfigError, match='model.safetensors is not a readable safetensors file'):
    hf.import_run(str(source), hf.experiment_config(str(source)), str(tmp_path / 'run'))
  (source / 'config.json').write_text('{"n_layer": 2,')
  with pytest.raises(ConfigError, match='config.json is not a JSON file'):
    hf.experiment_config(str(source))


def test_an_import_without_a_config_works_from_any_folder(tokenizer, tmp_path):
  source = write_hf_dir(tmp_path / 'hf', tokenizer)
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  out = run(
    [*CONVERT, f'--from_hf={source}', '--workdir=run'],
    cwd=elsewhere,
    env=subprocess_env(),
    timeout=120,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert (elsewhere / 'run' / 'checkpoints' / '0').is_dir()
