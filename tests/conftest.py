"""Test setup: 8 simulated CPU devices (set before jax loads), shared data, tiny configs."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()

import json  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

from ar_jax import config as config_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / 'shared' / 'data'


@pytest.fixture
def shared_data() -> pathlib.Path:
  """../shared/data, read in place; tests that need it skip when it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f'shared test data not found at {SHARED_DATA}')
  return SHARED_DATA


@pytest.fixture
def text_file(tmp_path) -> pathlib.Path:
  """A small English-like text file for fast end-to-end runs."""
  words = [
    'the',
    'quick',
    'brown',
    'fox',
    'jumps',
    'over',
    'the',
    'lazy',
    'dog',
    'and',
    'runs',
  ]
  lines = [' '.join(words[i % 7 :] + words[: i % 7]) for i in range(400)]
  path = tmp_path / 'corpus.txt'
  path.write_text('\n'.join(lines) + '\n')
  return path


def tiny_config(path: pathlib.Path | str = '', **overrides):
  """A transformer small enough to compile and train in seconds, on data.path, one device."""
  c = config_lib.defaults()
  c.data.name = 'files'
  c.data.path = str(path)
  c.data.tokenizer = 'char'
  c.data.seq_len = 16
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.d_model = 16
  c.model.max_len = 32
  c.batch_size = 8
  c.num_train_steps = 6
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.eval_batches = 2
  c.checkpoint_every_steps = 3
  c.optim.warmup_steps = 1
  c.mesh.data = 1
  c.sample.max_new_tokens = 8
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
