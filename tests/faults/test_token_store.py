"""A token store meeting faults: a prepare on a full disk stops in one line and leaves no
temporary files (and finishes the same store once there is room); a shard whose token ids
were changed after it was prepared is named, not trained into a NaN."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from ar_jax.data import store
from ar_jax.errors import ConfigError
from tests.faults.runner import one_line_error, run, run_command
from tests.helpers import tiny_config

WORDS = 'the quick brown fox jumps over a lazy dog while seven wizards quietly hex'.split()  # noqa: SIM905


@pytest.fixture(scope='module')
def documents(tmp_path_factory):
  root = tmp_path_factory.mktemp('documents')
  rng = np.random.default_rng(0)
  for i in range(30):
    words = rng.choice(WORDS, size=int(rng.integers(200, 3000)))
    (root / f'doc_{i:02d}.txt').write_text(' '.join(words) + '\n')
  return root


def prepare_command(documents, out):
  return [
    sys.executable,
    '-m',
    'ar_jax.prepare',
    f'--config=tests/faults/run_config.py:{documents}',
    f'--out={out}',
    '--num_workers=1',
    '--shard_mb=0.02',
  ]


def test_prepare_on_a_full_disk_is_one_line_and_leaves_no_temporary_file(
  documents, tmp_path, small_filesystem
):
  whole = tmp_path / 'whole'
  run_command(prepare_command(documents, whole))
  size = sum(f.stat().st_size for f in whole.iterdir())
  with small_filesystem(tmp_path / 'disk', f'size={size // 2}') as disk:
    out = run_command(prepare_command(documents, disk / 'store'), check=False)
    one_line_error(out)
    assert f'writing {disk}/store/' in out.stderr and 'No space left' in out.stderr
    assert 'run the same prepare again' in out.stderr
    left = os.listdir(disk / 'store')
    assert left and not [n for n in left if n.endswith('.tmp')]
    assert 'manifest.json' not in left
    # With room again (the tmpfs grown), the same command finishes the same store.
    os.system(f'mount -o remount,size={4 * size} {disk}')
    run_command(prepare_command(documents, disk / 'store'))
    assert sorted(os.listdir(disk / 'store')) == sorted(os.listdir(whole))
    for name in os.listdir(whole):
      assert (disk / 'store' / name).read_bytes() == (whole / name).read_bytes(), name


def test_token_ids_outside_the_vocabulary_are_named_with_their_shard(documents, tmp_path):
  prepared = tmp_path / 'store'
  run_command(prepare_command(documents, prepared))
  manifest = json.loads((prepared / 'manifest.json').read_text())
  shard = manifest['splits']['train']['shards'][1]
  assert 0 < shard['max_id'] < manifest['tokenizer']['vocab_size']
  path = prepared / shard['file']
  tokens = np.load(path)
  tokens[len(tokens) // 2 :] = 65535  # overwritten after the prepare
  np.save(path, tokens)
  out = run(documents, tmp_path / 'run', f'--config.data.prepared={prepared}', check=False)
  one_line_error(out)
  assert f'store {prepared}: shard {shard["file"]} holds token id 65535 at offset' in out.stderr
  assert 'non-finite' not in out.stderr

  # A manifest that records such ids is refused when the store is opened.
  shard['max_id'] = 65535
  with pytest.raises(ConfigError, match=f'shard {shard["file"]} holds token ids up to 65535'):
    store.open_split(str(prepared), 'train', manifest)


def test_a_store_from_before_max_ids_still_opens(documents, tmp_path):
  """Stores prepared before shards recorded their largest id are read as they are."""
  prepared = tmp_path / 'store'
  store.prepare(tiny_config(documents).data, str(prepared), shard_bytes=20_000)
  manifest = json.loads((prepared / 'manifest.json').read_text())
  for shard in manifest['splits']['train']['shards']:
    del shard['max_id']
  tokens = store.open_split(str(prepared), 'train', manifest)
  assert tokens.windows(np.array([0]), 8).shape == (1, 8)
  shutil.rmtree(prepared)
