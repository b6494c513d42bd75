"""Bad input on the command line: one clear message and a non-zero exit, never a traceback
from deep inside JAX. (More cases, for sampling and config args, are in tests/test_cli.py.)"""

import pytest

from tests.faults.test_faults import corpus, run  # noqa: F401 - corpus is a fixture


@pytest.mark.parametrize(
  'overrides, message',
  [
    (['--config.batch_size=12.5'], 'batch_size'),  # a float for an int field
    (['--config.batch_size=-4'], 'batch_size must be positive, got -4'),
    (['--config.model.d_model=0'], 'model.d_model must be positive, got 0'),
    (['--config.mesh.tensor=16'], 'tensor=16 needs 16 devices; 1 are present'),
    (['--config.data.train_split=training'], "split 'training' does not exist for files"),
    (['--config.model.num_heads=3'], 'model.num_heads=3 does not divide model.d_model=16'),
    (['--config.nan_policy=ignore'], "nan_policy='ignore'; allowed: stop, skip"),
  ],
)
def test_bad_values_fail_with_one_message(corpus, tmp_path, overrides, message):  # noqa: F811
  out = run(corpus, tmp_path / 'run', *overrides, check=False)
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr
  assert not (tmp_path / 'run').exists()


def test_invalid_utf8_at_character_level_is_named(tmp_path):
  bad = tmp_path / 'latin1.txt'
  bad.write_bytes('caf\xe9 au lait\n'.encode('latin-1') * 50)
  out = run(bad, tmp_path / 'run', check=False)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'is not valid UTF-8 at byte 3' in out.stderr
  assert "data.tokenizer='byte'" in out.stderr
