"""Subword tokenizers through the `tokenizers` and `sentencepiece` libraries: byte-level BPE
(GPT-2's scheme; trained here, or loaded from a Hugging Face tokenizer.json such as GPT-2's
or Llama 3's) and SentencePiece (BPE or unigram; trained here, or loaded from a .model).

Both are kept lossless, so bits per byte stay exact: decode(encode(text)) == text, and every
token stands for a whole number of the text's UTF-8 bytes (token_bytes), whatever its
boundaries. Byte-level BPE is lossless by construction (each character of a token is one
byte). SentencePiece is trained with identity normalization, no dummy prefix and byte
fallback (a character it has no piece for becomes its UTF-8 bytes); a loaded model must be
the same kind, or it is refused, naming the setting.
"""

import base64
import dataclasses
import functools
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from ar_jax.data.sources import decode_utf8
from ar_jax.errors import ConfigError, check

KINDS = ('bpe', 'sentencepiece')
SP_MODEL_TYPES = ('bpe', 'unigram')
# End-of-document token names, in the order a loaded tokenizer's special tokens are searched.
EOS_NAMES = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>')


@dataclasses.dataclass(frozen=True)
class Subword:
  """A subword tokenizer; `model` is the library's own serialization (the tokenizer.json
  text for 'bpe', a base64 .model for 'sentencepiece'), so it travels as JSON in the workdir
  and the checkpoint's metadata. `eos_id` ends every document."""

  kind: str
  model: str
  eos_id: int

  @functools.cached_property
  def _impl(self):
    if self.kind == 'bpe':
      import tokenizers

      return tokenizers.Tokenizer.from_str(self.model)
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_proto=base64.b64decode(self.model))

  @property
  def vocab_size(self) -> int:
    if self.kind == 'bpe':
      return self._impl.get_vocab_size(with_added_tokens=True)
    return self._impl.get_piece_size()

  @functools.cached_property
  def token_bytes(self) -> np.ndarray:
    """UTF-8 bytes of the text each token stands for (0 for special tokens)."""
    sizes = np.zeros(self.vocab_size, np.int32)
    if self.kind == 'bpe':
      added = {t.content: t.special for t in self._impl.get_added_tokens_decoder().values()}
      for token, i in self._impl.get_vocab(with_added_tokens=True).items():
        if token in added:  # plain text, or a special token standing for no text
          sizes[i] = 0 if added[token] else len(token.encode())
        else:  # a byte-level token spells one byte per character
          sizes[i] = len(token)
      return sizes
    sp = self._impl
    for i in range(self.vocab_size):
      if sp.is_byte(i):
        sizes[i] = 1
      elif not (sp.is_control(i) or sp.is_unknown(i)):
        sizes[i] = len(sp.id_to_piece(i).replace('\u2581', ' ').encode())
    return sizes

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = decode_utf8(text, 'text', 'fix the file')
    return self.encode_texts([text])[0]

  def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
    if self.kind == 'bpe':
      encoded = [e.ids for e in self._impl.encode_batch(texts, add_special_tokens=False)]
    else:
      encoded = self._impl.encode(texts)
    return [np.asarray(ids, np.int32) for ids in encoded]

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids if int(i) != self.eos_id]
    if self.kind == 'bpe':
      return self._impl.decode(ids, skip_special_tokens=False)
    return self._impl.decode(ids)

  def save(self, path: str) -> None:
    with open(path, 'w') as f:
      json.dump(dataclasses.asdict(self), f)


def sample_texts(docs: Iterable[bytes], max_bytes: int) -> Iterator[str]:
  """The training split's documents, in order, up to max_bytes in all: a tokenizer is trained
  on a bounded sample, however large the corpus."""
  left = max_bytes
  for doc in docs:
    if left <= 0:
      return
    yield doc[:left].decode('utf-8', errors='ignore')
    left -= len(doc)


def train_bpe(texts: Iterator[str], vocab_size: int) -> Subword:
  """Byte-level BPE as GPT-2's: the 256 byte symbols, merges learned up to vocab_size, and
  <|endoftext|> between documents."""
  import tokenizers as hf

  check(
    vocab_size >= 257,
    f'data.vocab_size={vocab_size} is too small for byte-level BPE: it needs the 256 bytes '
    'and the end-of-document token (257)',
  )
  tok = hf.Tokenizer(hf.models.BPE())
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOS_NAMES[0]],
    initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  return Subword('bpe', tok.to_str(), tok.token_to_id(EOS_NAMES[0]))


def train_sentencepiece(texts: Iterator[str], vocab_size: int, model_type: str) -> Subword:
  """SentencePiece (Kudo & Richardson 2018), lossless: identity normalization, no dummy
  prefix, whitespace kept, byte fallback. Its sentences are the sample's lines."""
  import io

  import sentencepiece

  check(
    model_type in SP_MODEL_TYPES,
    f'data.sentencepiece_model_type={model_type!r}; allowed: {", ".join(SP_MODEL_TYPES)}',
  )
  check(
    vocab_size >= 260,
    f'data.vocab_size={vocab_size} is too small for SentencePiece with byte fallback: it '
    'needs the 256 bytes, unknown, end of document and at least two pieces (260)',
  )
  lines = (line for text in texts for line in text.split('\n') if line)
  model = io.BytesIO()
  try:
    sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=lines,
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      normalization_rule_name='identity',
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      split_by_whitespace=True,
      byte_fallback=True,
      character_coverage=1.0,
      hard_vocab_limit=False,  # a small corpus may not have vocab_size pieces to give
      unk_id=0,
      eos_id=1,
      bos_id=-1,
      pad_id=-1,
      minloglevel=2,
    )
  except RuntimeError as e:
    raise ConfigError(f'SentencePiece could not train on the training split: {e}') from e
  return _sentencepiece(model.getvalue(), 'the trained model')


def load(path: str, eos_token: str = '') -> Subword:
  """A Hugging Face tokenizer.json (byte-level BPE) or a SentencePiece .model from a path."""
  check(os.path.isfile(path), f'data.tokenizer_path={path} is not a file')
  if path.endswith('.model'):
    with open(path, 'rb') as f:
      return _sentencepiece(f.read(), path)
  import tokenizers as hf

  try:
    with open(path) as f:
      text = f.read()
    tok = hf.Tokenizer.from_str(text)
  except Exception as e:  # the library raises a bare Exception on a file it cannot parse
    raise ConfigError(f'{path} is not a Hugging Face tokenizer.json: {e}') from e
  spec = json.loads(text)
  decoder = json.dumps(spec.get('decoder'))
  check(
    '"ByteLevel"' in decoder and spec.get('normalizer') is None,
    f'{path} is not a byte-level BPE without a normalizer (decoder {decoder}, normalizer '
    f'{json.dumps(spec.get("normalizer"))}): bits per byte need a tokenizer whose tokens '
    'spell the text exactly',
  )
  specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
  names = (eos_token,) if eos_token else EOS_NAMES
  eos = next((n for n in names if n in specials), None)
  check(
    eos is not None,
    f'{path} has no end-of-document token among its special tokens ({", ".join(specials)}); '
    'name one with data.eos_token',
  )
  return Subword('bpe', tok.to_str(), tok.token_to_id(eos))


def _sentencepiece(proto: bytes, where: str) -> Subword:
  import sentencepiece
  from sentencepiece import sentencepiece_model_pb2

  spec = sentencepiece_model_pb2.ModelProto()
  try:
    spec.ParseFromString(proto)
  except Exception as e:  # protobuf's DecodeError
    raise ConfigError(f'{where} is not a SentencePiece model: {e}') from e
  lossless = {
    'normalization': (spec.normalizer_spec.name, 'identity'),
    'add_dummy_prefix': (spec.normalizer_spec.add_dummy_prefix, False),
    'remove_extra_whitespaces': (spec.normalizer_spec.remove_extra_whitespaces, False),
    'byte_fallback': (spec.trainer_spec.byte_fallback, True),
  }
  wrong = [f'{k}={have!r} (needs {want!r})' for k, (have, want) in lossless.items() if have != want]
  check(
    not wrong,
    f'{where} is not lossless, so bits per byte could not be exact: {", ".join(wrong)}',
  )
  sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
  check(sp.eos_id() >= 0, f'{where} has no end-of-sequence piece')
  return Subword('sentencepiece', base64.b64encode(proto).decode(), sp.eos_id())
