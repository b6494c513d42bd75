"""Subword tokenizers: lossless on real text, exact bits per byte, the libraries' own ids
when loaded from their files, and bad files and settings named in one line."""

import base64
import io
import json
import re

import numpy as np
import pytest

from ar_jax import config as config_lib
from ar_jax import train
from ar_jax.data import tokenizers
from ar_jax.errors import ConfigError
from tests.helpers import tiny_config, whole_documents


def chunks(docs):
  return [(doc, True) for doc in docs]


KINDS = {  # kind and its data.* settings
  'bpe': {'tokenizer': 'bpe'},
  'sentencepiece-bpe': {'tokenizer': 'sentencepiece', 'sentencepiece_model_type': 'bpe'},
  'sentencepiece-unigram': {'tokenizer': 'sentencepiece', 'sentencepiece_model_type': 'unigram'},
}


@pytest.fixture(scope='module')
def corpus():
  """The embedded corpus (this interpreter's standard library): 300 training files and 40
  held-out ones, enough for every kind of text the sources hold."""
  data = config_lib.defaults().data
  return whole_documents(data, 'train')[:300], whole_documents(data, 'validation')[:40]


def data_config(vocab_size=1024, **fields):
  data = config_lib.defaults().data
  data.vocab_size = vocab_size
  data.tokenizer_train_bytes = 300_000
  for k, v in fields.items():
    data[k] = v
  return data


@pytest.fixture(scope='module')
def trained(corpus):
  train_docs, _ = corpus
  return {k: tokenizers.from_config(data_config(**v), chunks(train_docs)) for k, v in KINDS.items()}


@pytest.mark.parametrize('kind', ['char', 'byte', *KINDS])
def test_every_tokenizer_is_lossless_and_counts_the_texts_bytes(kind, corpus, trained):
  train_docs, held_out = corpus
  if kind in KINDS:
    tok = trained[kind]
  else:  # a character vocabulary covers what it was built from
    tok, held_out = tokenizers.build(kind, train_docs), train_docs[:40]
  for doc in held_out:
    ids = tok.encode(doc)
    assert tok.decode(ids) == doc.decode()
    assert tok.token_bytes[ids].sum() == len(doc)
  stream = tokenizers.encode(tok, chunks(held_out), 'held_out').tokens
  # Bits per byte divide by exactly the text's bytes: eos stands for none.
  assert tok.token_bytes[stream].sum() == sum(map(len, held_out))
  if kind in KINDS:
    assert tok.vocab_size <= 1024 and tok.token_bytes[tok.eos_id] == 0
    assert len(stream) < 0.6 * sum(map(len, held_out))  # subwords: fewer tokens than bytes


def test_a_saved_subword_tokenizer_loads_equal(tmp_path, trained):
  for tok in trained.values():
    tok.save(tmp_path / 'tok.json')
    assert tokenizers.load(tmp_path / 'tok.json') == tok


def test_a_loaded_tokenizer_json_gives_the_librarys_own_ids(tmp_path, corpus, trained):
  import tokenizers as hf

  path = tmp_path / 'tokenizer.json'
  path.write_text(trained['bpe'].model)
  loaded = tokenizers.from_config(data_config(tokenizer='bpe', tokenizer_path=str(path)), [])
  reference = hf.Tokenizer.from_file(str(path))
  for doc in corpus[1][:10]:
    assert loaded.encode(doc).tolist() == reference.encode(doc.decode()).ids
  assert loaded.eos_id == reference.token_to_id('<|endoftext|>')


def test_a_loaded_sentencepiece_model_gives_the_librarys_own_ids(tmp_path, corpus, trained):
  import sentencepiece

  path = tmp_path / 'sp.model'
  path.write_bytes(base64.b64decode(trained['sentencepiece-unigram'].model))
  loaded = tokenizers.from_config(
    data_config(tokenizer='sentencepiece', tokenizer_path=str(path)), []
  )
  reference = sentencepiece.SentencePieceProcessor(model_file=str(path))
  for doc in corpus[1][:10]:
    assert loaded.encode(doc).tolist() == reference.encode(doc.decode())


def lossy_sentencepiece(path):
  """A SentencePiece model with its default dummy prefix (T5's and Llama 2's convention)."""
  import sentencepiece

  model = io.BytesIO()
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(['a b c d e f g h'] * 50),
    model_writer=model,
    vocab_size=20,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  path.write_bytes(model.getvalue())


def word_level_json(path):
  import tokenizers as hf

  tok = hf.Tokenizer(hf.models.WordLevel({'a': 0, '[UNK]': 1}, unk_token='[UNK]'))
  tok.pre_tokenizer = hf.pre_tokenizers.Whitespace()
  path.write_text(tok.to_str())


@pytest.mark.parametrize(
  'fields, make, message',
  [
    ({'tokenizer': 'bpe', 'tokenizer_path': 'missing.json'}, None, 'missing.json is not a file'),
    ({'tokenizer': 'bpe'}, lambda p: p.write_text('{oops'), 'is not a Hugging Face tokenizer'),
    ({'tokenizer': 'bpe'}, word_level_json, 'is not a byte-level BPE without a normalizer'),
    ({'tokenizer': 'sentencepiece'}, lambda p: p.write_bytes(b'\x01\x02garbage'), 'is not a'),
    ({'tokenizer': 'sentencepiece'}, lossy_sentencepiece, 'add_dummy_prefix=True (needs False)'),
    ({'tokenizer': 'bpe', 'vocab_size': 100}, None, 'too small for byte-level BPE'),
    ({'tokenizer': 'sentencepiece', 'vocab_size': 100}, None, 'too small for SentencePiece'),
  ],
)
def test_bad_tokenizer_files_and_settings_are_one_clear_error(tmp_path, fields, make, message):
  if make is not None:
    suffix = '.model' if fields['tokenizer'] == 'sentencepiece' else '.json'
    path = tmp_path / f'tok{suffix}'
    make(path)
    fields = {**fields, 'tokenizer_path': str(path)}
  with pytest.raises(ConfigError, match=re.escape(message)):
    tokenizers.from_config(data_config(**fields), chunks([b'some training text']))


def test_a_run_trains_samples_and_resumes_through_a_bpe_tokenizer(tmp_path, corpus):
  """The tokenizer is trained once, saved in the workdir, and reused on resume."""
  text = tmp_path / 'corpus.txt'
  text.write_bytes(b'\n'.join(corpus[0][:20]))
  cfg = tiny_config(text, **{'data.tokenizer': 'bpe', 'data.vocab_size': 300})
  final = train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert np.isfinite(final['eval/bits_per_byte']) and 'eval/bits_per_char' not in final
  saved = json.loads((tmp_path / 'run' / 'tokenizer.json').read_text())
  assert saved['kind'] == 'bpe' and saved['eos_id'] == 0  # the trainer puts specials first
  assert (tmp_path / 'run' / 'samples.txt').read_text().startswith('=== step 6\n')
  cfg.num_train_steps = 8
  train.train_and_evaluate(cfg, str(tmp_path / 'run'))
  assert json.loads((tmp_path / 'run' / 'tokenizer.json').read_text()) == saved
