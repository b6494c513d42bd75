"""Test setup: 8 simulated CPU devices (set before jax loads) and the shared test data."""

import atexit
import os
import shutil
import tempfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
# XLA compiles with most optimisations off (LLVM level 0, no expensive passes): the tests'
# models are tiny, so compiling is most of their time, and the contract and transformer
# tests run a third faster so. A test that trains for long takes the `optimised` fixture;
# JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs every test on optimised programs.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
# Many tests (and their subprocesses, which inherit this) compile the same small programs: a
# persistent compilation cache for the run compiles each once. Private to the run (made by
# the first process, pytest-xdist's controller, and inherited by its workers), and removed
# at its end.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ar_jax_test_jax_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# The measured CPU peak (for MFU) is cached per run too, not in the user's ~/.cache.
os.environ.setdefault('AR_JAX_CACHE_DIR', os.environ['JAX_COMPILATION_CACHE_DIR'])

import pathlib  # noqa: E402

import pytest  # noqa: E402

from tests.helpers import REPO, kill_started, write_corpus  # noqa: E402

# Interrupted (Ctrl-C), a run still kills what its tests started.
atexit.register(kill_started)

SHARED_DATA = REPO.parent / 'shared' / 'data'


def pytest_collection_modifyitems(items):
  """Tests marked slow (20 s or more on two cores) first, in their order: the tests a worker
  runs last are then short, and the two workers finish together."""
  items.sort(key=lambda item: item.get_closest_marker('slow') is None)


@pytest.fixture(autouse=True)
def _kill_what_the_test_started():
  """Every process a test starts (tests.helpers.start, run) is killed when it ends."""
  yield
  kill_started()


@pytest.fixture
def optimised():
  """XLA's full optimisation for this test's compiles, where running the programs costs
  more than compiling them (the pixelcnn at 60 steps: 53 s unoptimised, 15 s optimised)."""
  import jax  # noqa: PLC0415

  jax.config.update('jax_disable_most_optimizations', False)
  yield
  unoptimised = os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] not in ('0', 'false', 'False')
  jax.config.update('jax_disable_most_optimizations', unoptimised)


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
