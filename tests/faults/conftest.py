"""The corpus every fault test trains on, and the uninterrupted run to compare against."""

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
