import ml_collections
import numpy as np
import pytest

from ar_jax import data
from ar_jax.data import batches, sources, tokenizers
from ar_jax.errors import ConfigError
from tests.helpers import tiny_config, whole_documents


def splits(data):
  return {split: whole_documents(data, split) for split in ('train', 'validation')}


def test_char_tokenizer_roundtrip_and_saved(tmp_path):
  tok = tokenizers.build('char', [b'hello world'])
  assert tok.vocab == tuple(sorted(set('hello world')))
  assert tok.eos_id is None  # one document: no separator, as nanoGPT's 65 characters
  ids = tok.encode('low del')
  assert tok.decode(ids) == 'low del'
  assert [tok.vocab[i] for i in ids] == list('low del')
  tok.save(tmp_path / 'tok.json')
  assert tokenizers.load(tmp_path / 'tok.json') == tok


def test_char_tokenizer_names_unknown_characters():
  tok = tokenizers.build('char', [b'abc'])
  with pytest.raises(ConfigError, match=r"character\(s\) 'xz' are not in the vocabulary"):
    tok.encode('axcz')


def test_a_split_with_characters_outside_the_vocabulary_names_them_and_the_fix():
  tok = tokenizers.build('char', [b'abc', b'cab'])
  with pytest.raises(ConfigError) as e:
    tokenizers.encode(tok, [(b'ab', True), (b'cx!', True)], 'files:validation')
  assert "files:validation[1]: character(s) '!x' are not in the vocabulary" in str(e.value)
  assert "data.tokenizer='byte' reads any text" in str(e.value)


def test_invalid_utf8_at_char_level_is_named():
  with pytest.raises(ConfigError, match=r'train\[1\] is not valid UTF-8 at byte 2'):
    tokenizers.build('char', [b'fine', b'ab\xff\xfe'])


def test_byte_tokenizer_separates_documents_and_counts_bytes():
  tok = tokenizers.build('byte', [])
  stream = tokenizers.encode(tok, [(b'ab', True), ('é'.encode(), True)], 'docs').tokens
  assert stream.tolist() == [97, 98, 256, 0xC3, 0xA9, 256]
  assert tok.decode(stream) == 'abé'
  assert tok.token_bytes[stream].sum() == 4  # eos stands for no bytes


def test_char_token_bytes_are_utf8_lengths():
  tok = tokenizers.build('char', ['aé€'.encode(), b'b'])
  assert dict(zip(tok.vocab, tok.token_bytes.tolist(), strict=True)) == {
    'a': 1,
    'b': 1,
    'é': 2,
    '€': 3,
    '<eos>': 0,
  }


def files_config(path, **kw):
  d = ml_collections.ConfigDict(
    dict(name='files', path=str(path), val_fraction=0.25, data_dir='', download=False)
  )
  d.update(kw)
  return d


def test_one_file_splits_by_position_like_nanogpt(tmp_path):
  (tmp_path / 'a.txt').write_bytes(b'0123456789abcdef')
  split = splits(files_config(tmp_path / 'a.txt'))
  assert split == {'train': [b'0123456789ab'], 'validation': [b'cdef']}


def test_many_files_split_whole_files_deterministically(tmp_path):
  for i in range(40):
    (tmp_path / f'{i}.py').write_bytes(f'x = {i}\n'.encode())
  a = splits(files_config(tmp_path))
  b = splits(files_config(str(tmp_path) + '/*.py'))
  assert a == b
  assert len(a['train']) + len(a['validation']) == 40
  assert 0 < len(a['validation']) < 20
  assert not set(a['train']) & set(a['validation'])


def test_embedded_stdlib_corpus_is_deterministic_and_disjoint():
  cfg = files_config('', name=sources.EMBEDDED, val_fraction=0.1)
  a = splits(cfg)
  b = splits(cfg)
  assert [len(d) for d in a['validation']] == [len(d) for d in b['validation']]
  assert sum(map(len, a['train'])) > 5_000_000  # the whole stdlib: megabytes of Python
  assert 0.03 < len(a['validation']) / (len(a['train']) + len(a['validation'])) < 0.2


def test_missing_and_empty_files_are_named(tmp_path):
  with pytest.raises(ConfigError, match='matches no file'):
    whole_documents(files_config(tmp_path / 'nope.txt'), 'train')
  (tmp_path / 'empty.txt').write_bytes(b'')
  with pytest.raises(ConfigError, match="split 'train' of .*empty.txt is empty"):
    whole_documents(files_config(tmp_path / 'empty.txt'), 'train')


def test_unknown_dataset_and_split_are_named(shared_data):
  tfds_dir = str(shared_data / 'tensorflow_datasets')
  with pytest.raises(ConfigError, match="unknown data.name='no_such_corpus'"):
    whole_documents(files_config('', name='no_such_corpus', data_dir=tfds_dir), 'train')
  cfg = files_config('', name='tiny_shakespeare', data_dir=tfds_dir, text_feature='text')
  with pytest.raises(ConfigError, match="split 'dev' is not available"):
    whole_documents(cfg, 'dev')


def test_tfds_tiny_shakespeare_is_nanogpts_split(shared_data):
  """train = the first 90% of input.txt; validation + test = nanoGPT's val split."""
  text = (shared_data / 'tinyshakespeare' / 'input.txt').read_bytes()
  cfg = tiny_config()
  cfg.data.name = 'tiny_shakespeare'
  cfg.data.data_dir = str(shared_data / 'tensorflow_datasets')
  cfg.data.eval_splits = ('validation', 'test')
  streams = data.load(cfg.data)
  tok = streams.tokenizer
  assert tok.vocab_size == 65
  cut = int(0.9 * len(text))
  assert tok.decode(streams.train).encode() == text[:cut]
  val = np.concatenate([streams.eval['validation'], streams.eval['test']])
  assert tok.decode(val).encode() == text[cut:]


def test_random_windows_are_corpus_slices_and_resume_exactly():
  tokens = np.arange(1000, dtype=np.uint16)
  kw = dict(batch_size=4, seq_len=8, seed=3, sampling='random')
  it = batches.train_iterator(tokens, **kw)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  later = [next(it) for _ in range(2)]
  for batch in first + later:
    assert batch.shape == (4, 9) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch - batch[:, :1], np.tile(np.arange(9), (4, 1)))
  resumed = batches.train_iterator(tokens, **kw)
  resumed.set_state(state)
  np.testing.assert_array_equal(np.stack([next(resumed) for _ in range(2)]), np.stack(later))
  other_seed = next(batches.train_iterator(tokens, **{**kw, 'seed': 4}))
  assert not np.array_equal(other_seed, first[0])


def test_processes_read_their_rows_of_the_same_global_batch():
  tokens = np.arange(500, dtype=np.uint16)
  kw = dict(batch_size=6, seq_len=4, seed=0, sampling='random')
  whole = next(batches.train_iterator(tokens, **kw))
  parts = [
    next(batches.train_iterator(tokens, process_index=p, process_count=3, **kw)) for p in range(3)
  ]
  np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_sequential_streams_continue_row_by_row():
  tokens = np.arange(100, dtype=np.uint16)
  it = batches.train_iterator(tokens, batch_size=2, seq_len=4, seed=0, sampling='sequential')
  b0, b1 = next(it), next(it)
  np.testing.assert_array_equal(b0, [[0, 1, 2, 3, 4], [50, 51, 52, 53, 54]])
  np.testing.assert_array_equal(b1, [[4, 5, 6, 7, 8], [54, 55, 56, 57, 58]])


def test_eval_batches_predict_every_token_once():
  tokens = np.arange(1, 38, dtype=np.uint16)  # 37 tokens: 36 predictions
  seen = []
  for batch, weights in batches.eval_batches(tokens, batch_size=2, seq_len=5):
    assert batch.shape == (2, 6) and weights.shape == (2, 5)
    seen.extend(batch[:, 1:][weights > 0].tolist())
  assert sorted(seen) == list(range(2, 38))


def test_too_short_training_split_is_named():
  with pytest.raises(ConfigError, match='has 5 tokens, too few for one window'):
    batches.train_iterator(np.arange(5), batch_size=1, seq_len=8, seed=0, sampling='random')


def test_packed_segments_start_at_each_end_of_document():
  eos = 9
  tokens = np.array([[5, eos, 3, 4, eos, 7], [eos, 1, 2, 3, 4, 5]])
  segments = batches.segments(tokens, eos)['segment_ids_BT']
  assert segments.tolist() == [[0, 1, 1, 1, 2, 2], [1, 1, 1, 1, 1, 1]]
  assert batches.segments(tokens, None) == {}


def test_packing_needs_documents_longer_than_a_window(tmp_path):
  docs = tmp_path / 'docs'
  docs.mkdir()
  for i in range(6):
    (docs / f'{i}.txt').write_text('short document\n' * (i + 1))
  c = tiny_config(docs, **{'data.packing': 'documents', 'data.seq_len': 200})
  with pytest.raises(ConfigError, match=r'longer than every training document \(the longest'):
    data.load(c.data)
  (tmp_path / 'one.txt').write_text('one long document\n' * 100)
  one_document = tiny_config(tmp_path / 'one.txt', **{'data.packing': 'documents'})
  with pytest.raises(ConfigError, match='needs an end-of-document token'):
    data.load(one_document.data)
  with pytest.raises(ConfigError, match=r"data.packing='whole'; allowed: none, documents"):
    data.load(tiny_config(docs, **{'data.packing': 'whole'}).data)


def test_invalid_utf8_documents_are_skipped_when_asked(tmp_path):
  (tmp_path / 'good.txt').write_bytes(b'plain text ' * 50)
  (tmp_path / 'bad.txt').write_bytes(b'caf\xe9 latin-1 ' * 50)
  c = tiny_config(tmp_path, **{'data.tokenizer': 'bpe', 'data.vocab_size': 300})
  c.data.val_fraction = 0.01  # both files train
  with pytest.raises(ConfigError, match=r'files:train\[0\] is not valid UTF-8 at byte 3'):
    data.load(c.data, train=True, evaluation=False)
  c.data.invalid_utf8 = 'skip'
  streams = data.load(c.data, train=True, evaluation=False)
  assert streams.tokenizer.decode(streams.train) == 'plain text ' * 50


def test_a_large_file_streams_in_pieces_that_tokenize_as_the_whole(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'PIECE_BYTES', 200)
  # Some lines end in a space, some start indented: no cut may fall beside either.
  lines = [
    ' ' * (i % 3) + f'value_{i} = compute({i}, "é")' + ' ' * (i % 5 == 0) + '\n' for i in range(300)
  ]
  text = ''.join(lines).encode()
  (tmp_path / 'big.txt').write_bytes(text)
  c = tiny_config(tmp_path / 'big.txt', **{'data.tokenizer': 'bpe', 'data.vocab_size': 320})
  chunks = list(sources.documents(c.data, 'train'))
  assert len(chunks) > 20 and [end for _, end in chunks].count(True) == 1 and chunks[-1][1]
  whole = b''.join(t for t, _ in chunks)
  assert whole == text[: int((1 - c.data.val_fraction) * len(text))]
  for t, _ in chunks:
    t.decode()  # every piece is whole characters
  tok = tokenizers.from_config(c.data, chunks)
  pieces = tokenizers.encode(tok, chunks, 'big').tokens
  np.testing.assert_array_equal(pieces[:-1], tok.encode(whole))  # all but the final eos
