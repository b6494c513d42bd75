"""The corpus every fault test trains on, the uninterrupted run to compare against, and small
real filesystems (a full disk, a read-only one)."""

import contextlib
import pathlib
import subprocess

import pytest

from tests.faults.runner import losses, run


@pytest.fixture(scope='session')
def corpus(tmp_path_factory):
  words = [
    'to',
    'be',
    'or',
    'not',
    'to',
    'be',
    'that',
    'is',
    'the',
    'question',
    'whether',
    'tis',
    'nobler',
    'in',
    'the',
    'mind',
  ]
  path = tmp_path_factory.mktemp('corpus') / 'corpus.txt'
  path.write_text('\n'.join(' '.join(words[i % 5 :] + words[: i % 5]) for i in range(300)))
  return path


@pytest.fixture(scope='session')
def reference(corpus, tmp_path_factory):
  """The uninterrupted run's loss at every step."""
  workdir = tmp_path_factory.mktemp('reference')
  run(corpus, workdir)
  return losses(workdir)


@pytest.fixture
def small_filesystem():
  """small_filesystem(path, options): a context manager mounting a tmpfs at path with mount
  options (size=2M: a disk that fills; nr_inodes=30: one that runs out of files; ro:
  read-only), unmounted when the block ends. Skips the test where mounting needs root."""

  @contextlib.contextmanager
  def mounted(path: pathlib.Path, options: str):
    path.mkdir()
    done = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(path)])
    if done.returncode != 0:
      pytest.skip('mounting a small tmpfs (a real full disk) needs root')
    try:
      yield path
    finally:
      subprocess.run(['umount', '-l', str(path)], check=True)

  return mounted
