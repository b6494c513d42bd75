"""Test setup: 8 simulated CPU devices (set before jax loads) and the shared test data."""

import os

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
# Many tests (and their subprocesses, which inherit this) compile the same small programs:
# a persistent compilation cache for the session compiles each once.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', f'/tmp/ar_jax_test_jax_cache_{os.getuid()}')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')

import pathlib  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import REPO, write_corpus  # noqa: E402

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
  return write_corpus(tmp_path / 'corpus.txt')
