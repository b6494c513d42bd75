"""The prepared token store: the same shards however many workers write them or however often
a prepare is killed, refused when it is not the run's, and streamed into exactly the
batches and evaluations the in-memory path gives."""

import filecmp
import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from ar_jax import data
from ar_jax.data import batches, sources, store
from ar_jax.errors import ConfigError
from tests.helpers import REPO, run, start, tiny_config

SHARD_BYTES = 20_000  # a few dozen shards of a small corpus
WORDS = 'the quick brown fox jumps over a lazy dog while seven wizards quietly hex'.split()  # noqa: SIM905


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  """80 documents of 1 to 40 KB: files split whole between train and validation."""
  root = tmp_path_factory.mktemp('corpus')
  rng = np.random.default_rng(0)
  for i in range(80):
    words = rng.choice(WORDS, size=int(rng.integers(200, 7000)))
    lines = [' '.join(words[j : j + 12]) for j in range(0, len(words), 12)]
    (root / f'doc_{i:02d}.txt').write_text('\n'.join(lines) + '\n')
  return root


def config(path, **overrides):
  return tiny_config(path, **overrides)


@pytest.fixture(scope='module')
def reference(corpus, tmp_path_factory):
  """The store one in-process worker prepares, uninterrupted."""
  out = tmp_path_factory.mktemp('reference')
  store.prepare(config(corpus).data, str(out), num_workers=1, shard_bytes=SHARD_BYTES)
  return out


def prepare_command(corpus, out, workers):
  return [
    sys.executable,
    '-m',
    'ar_jax.prepare',
    f'--config=tests/faults/run_config.py:{corpus}',
    f'--out={out}',
    f'--num_workers={workers}',
    f'--shard_mb={SHARD_BYTES / 2**20}',
  ]


def assert_same_store(a, b):
  names = sorted(os.listdir(a))
  assert names == sorted(os.listdir(b))
  assert not [n for n in names if n.endswith('.tmp')]
  _, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
  assert not mismatch and not errors


def test_the_store_holds_the_in_memory_streams(corpus, reference):
  manifest = json.loads((reference / 'manifest.json').read_text())
  train = manifest['splits']['train']
  assert len(train['shards']) > 10 and manifest['dtype'] == 'uint16'
  streams = data.load(config(corpus).data)
  for split, tokens in [('train', streams.train), ('validation', streams.eval['validation'])]:
    stored = store.open_split(str(reference), split, manifest)
    assert len(stored) == len(tokens) == manifest['splits'][split]['tokens']
    np.testing.assert_array_equal(stored.windows(np.array([0]), len(tokens))[0], tokens)
  lengths = np.diff(np.flatnonzero(streams.train == streams.tokenizer.eos_id), prepend=-1)
  assert train['longest_document'] == lengths.max()
  assert train['documents'] == len(lengths)


def test_three_workers_and_a_kill_9_give_the_same_store(corpus, reference, tmp_path):
  """Killed (the parent alone, by SIGKILL) mid-prepare, its workers die with it; started
  again with another worker count, it finishes the same store byte for byte."""
  out = tmp_path / 'store'
  proc = start(prepare_command(corpus, out, 2), cwd=REPO)
  deadline = time.time() + 120
  while len(list(out.glob('train-*.json'))) < 3:
    assert proc.poll() is None and time.time() < deadline, 'the prepare ended before the kill'
    time.sleep(0.002)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (out / 'manifest.json').exists()
  time.sleep(1)
  survivors = [p for p in os.listdir('/proc') if p.isdigit() and _group(p) == proc.pid]
  assert not survivors, 'workers outlived the killed prepare'
  out_run = run(prepare_command(corpus, out, 3), timeout=120, cwd=REPO)
  assert out_run.returncode == 0, out_run.stderr[-2000:]
  assert 'train on it with --config.data.prepared=' in out_run.stdout
  assert_same_store(out, reference)


def _group(pid: str) -> int | None:
  """The process group of a live process (not a zombie, which no one may reap here)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      state, _, group = f.read().rsplit(')', 1)[1].split()[:3]
  except (OSError, ValueError):
    return None
  return None if state == 'Z' else int(group)


@pytest.mark.parametrize('sampling', ['random', 'sequential'])
def test_store_batches_equal_in_memory_batches_and_resume(corpus, reference, sampling):
  c = config(corpus)
  memory = data.load(c.data).train
  stored = data.load(config(corpus, **{'data.prepared': str(reference)}).data).train
  assert isinstance(stored, store.Tokens) and len(stored.shards) > 10
  kw = dict(batch_size=8, seq_len=100, seed=5, sampling=sampling)
  a, b = batches.train_iterator(memory, **kw), batches.train_iterator(stored, **kw)
  for _ in range(5):
    np.testing.assert_array_equal(next(a), next(b))
  state, later = b.get_state(), [next(b) for _ in range(3)]
  resumed = batches.train_iterator(stored, **kw)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack([next(resumed) for _ in range(3)]), np.stack(later))
  # Two processes, each reading its own rows, make the one process's global batch.
  halves = [batches.train_iterator(stored, **kw, process_index=i, process_count=2) for i in (0, 1)]
  whole = batches.train_iterator(stored, **kw)
  np.testing.assert_array_equal(np.concatenate([next(h) for h in halves]), next(whole))


def test_windows_across_shards_equal_the_whole_array():
  tokens = np.arange(1000, dtype=np.uint16)
  sharded = store.Tokens([tokens[:7], tokens[7:400], tokens[400:401], tokens[401:]])
  starts = np.array([0, 3, 5, 390, 399, 400, 990, 995])
  np.testing.assert_array_equal(
    sharded.windows(starts, 11), store.Tokens([tokens]).windows(starts, 11)
  )
  kw = dict(batch_size=4, seq_len=9, seed=1, sampling='examples')
  np.testing.assert_array_equal(
    next(batches.train_iterator(sharded, **kw)), next(batches.train_iterator(tokens, **kw))
  )


def test_evaluation_batches_from_the_store_equal_in_memory(corpus, reference):
  memory = data.load(config(corpus).data).eval['validation']
  stored = data.load(config(corpus, **{'data.prepared': str(reference)}).data).eval['validation']
  kw = dict(batch_size=8, seq_len=64)
  pairs = zip(batches.eval_batches(memory, **kw), batches.eval_batches(stored, **kw), strict=True)
  targets = 0
  for (tokens_a, weights_a), (tokens_b, weights_b) in pairs:
    np.testing.assert_array_equal(tokens_a, tokens_b)
    np.testing.assert_array_equal(weights_a, weights_b)
    targets += weights_b.sum()
  assert targets == len(memory) - 1  # every token after the first, once


def test_a_truncated_shard_and_another_tokenizer_are_refused(corpus, reference, tmp_path):
  out = tmp_path / 'store'
  os.system(f'cp -r {reference} {out}')
  c = config(corpus, **{'data.prepared': str(out)})
  with pytest.raises(ConfigError, match='prepared with a char tokenizer .*; data.tokenizer=.byte'):
    data.load(config(corpus, **{'data.prepared': str(out), 'data.tokenizer': 'byte'}).data)
  other = data.load(config(corpus, **{'data.tokenizer': 'byte'}).data).tokenizer
  with pytest.raises(ConfigError, match=r"prepared with a char tokenizer .*; the run's .* byte"):
    data.load(c.data, other)
  shard = out / 'train-00003.tokens.npy'
  shard.write_bytes(shard.read_bytes()[:-10])
  with pytest.raises(ConfigError, match='shard train-00003.tokens.npy is unreadable or truncated'):
    data.load(c.data)


def test_a_half_prepared_store_of_another_spec_is_refused(corpus, reference, tmp_path):
  with pytest.raises(ConfigError, match='holds a store prepared as'):
    store.prepare(config(corpus).data, str(reference), shard_bytes=SHARD_BYTES * 2)


def test_jsonl_and_parquet_records_are_documents(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  texts = [f'record {i}: ' + 'x' * i for i in range(200)]
  (tmp_path / 'a.jsonl').write_text(
    ''.join(json.dumps({'text': t, 'id': i}) + '\n' for i, t in enumerate(texts))
  )
  pq.write_table(pa.table({'text': texts}), tmp_path / 'b.parquet')
  for name in ('a.jsonl', 'b.parquet'):
    c = config(tmp_path / name, **{'data.tokenizer': 'byte'})
    split = {
      s: [t.decode() for t, _ in sources.documents(c.data, s)] for s in ('train', 'validation')
    }
    assert sorted(split['train'] + split['validation']) == sorted(texts)
    assert 5 < len(split['validation']) < 60


@pytest.mark.parametrize(
  'contents, message',
  [
    ('{"text": "fine"}\nnot json\n', r'a.jsonl:2 is not JSON'),
    ('{"text": "fine"}\n{"body": "x"}\n', r"a.jsonl:2 has no text field 'text' .*it has: body"),
  ],
)
def test_bad_jsonl_is_named_by_line(tmp_path, contents, message):
  (tmp_path / 'a.jsonl').write_text(contents)
  c = config(tmp_path / 'a.jsonl', **{'data.tokenizer': 'byte', 'data.val_fraction': 0.5})
  with pytest.raises(ConfigError, match=message):
    list(sources.documents(c.data, 'train'))


def test_a_parquet_file_without_the_text_column_is_named(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({'body': ['a', 'b']}), tmp_path / 'a.parquet')
  c = config(tmp_path / 'a.parquet', **{'data.tokenizer': 'byte'})
  with pytest.raises(ConfigError, match=r"a.parquet has no column 'text'; its columns: body"):
    list(sources.documents(c.data, 'train'))


def test_a_run_trains_on_packed_documents_from_the_store(corpus, reference, tmp_path):
  from ar_jax import train

  c = config(corpus, **{'data.prepared': str(reference), 'data.packing': 'documents'})
  final = train.train_and_evaluate(c, str(tmp_path / 'run'))
  assert np.isfinite(final['eval/loss']) and final['eval/tokens'] > 0
  resumed = train.train_and_evaluate(c, str(tmp_path / 'run'))  # the workdir's tokenizer
  assert resumed['eval/loss'] == final['eval/loss']


def test_prepare_names_a_bad_tokenizer_file_in_one_line(corpus, tmp_path):
  command = prepare_command(corpus, tmp_path / 'store', 1) + [
    '--config.data.tokenizer=bpe',
    f'--config.data.tokenizer_path={tmp_path / "missing.json"}',
  ]
  out = run(command, timeout=120, cwd=REPO)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].endswith('missing.json is not a file')
  assert not (tmp_path / 'store' / 'manifest.json').exists()


def test_compiling_alone_never_fills_a_store(corpus, tmp_path):
  c = config(corpus, **{'data.prepared': str(tmp_path / 'store'), 'data.tokenizer': 'byte'})
  assert data.load(c.data, train=False, evaluation=False).tokenizer.vocab_size == 257
  assert not (tmp_path / 'store').exists()
