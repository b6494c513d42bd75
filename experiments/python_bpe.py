"""The quickstart's transformer on byte-level BPE tokens instead of bytes, through a token
store, at the quickstart's training FLOPs: which reads Python better for the same compute?

  python -m ar_jax.prepare --config=experiments/python_bpe.py --out=stores/python_bpe
  python -m ar_jax.main --config=experiments/python_bpe.py --workdir=workdirs/python_bpe

Both runs are scored in bits per byte on every byte of the same held-out files (the
validation split of the embedded corpus); README.md has the comparison and its commands.
Arg key: store=DIR (data.prepared; default stores/python_bpe, prepared on first use).
"""

from ar_jax import models
from ar_jax.config import parse_arg
from experiments import quickstart

VOCAB = 4096  # BPE merges learned on the training files; the model stays quickstart-sized


def get_config(arg: str | None = None):
  args = parse_arg(arg, {'store': None})
  c = quickstart.get_config()
  c.data.tokenizer = 'bpe'
  c.data.vocab_size = VOCAB
  c.data.prepared = args['store'] or 'stores/python_bpe'
  # 4 of the 1,612 training files are deliberately not UTF-8 (tests of Python's source
  # encodings); BPE reads text, so they are left out. The held-out files are all UTF-8.
  c.data.invalid_utf8 = 'skip'
  # The quickstart's training FLOPs: its steps times the FLOPs per token of the byte model
  # over those of this one (the larger output layer costs more per token).
  seq_len = c.data.seq_len
  byte_flops = models.size(c.model, 257, seq_len)[1]
  bpe_flops = models.size(c.model, VOCAB, seq_len)[1]
  c.num_train_steps = round(c.num_train_steps * byte_flops / bpe_flops)
  c.eval_every_steps = c.checkpoint_every_steps = 250
  return c
