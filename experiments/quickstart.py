"""A small transformer on the Python standard library's own sources, byte level.

Needs no download and no accelerator: a few minutes on a 2-core CPU, ending with a sample
that reads like Python.

  python -m ar_jax.main --config=experiments/quickstart.py --workdir=workdirs/quickstart

Every field is described in ar_jax/config.py; the comments here say why a value is chosen.
"""

from ar_jax.config import defaults, parse_arg


def get_config(arg: str | None = None):
  parse_arg(arg, {})  # no variants: any arg is an error
  c = defaults()
  c.data.name = 'python_stdlib'  # every .py file of this interpreter's stdlib, split by file
  c.data.tokenizer = 'byte'  # source files are bytes; no vocabulary to build
  c.data.seq_len = 256  # the end-of-run sample (prompt + 250 bytes) stays inside it
  c.data.eval_splits = ('validation',)  # 10% of the files, held out whole
  c.model.num_layers = 4  # 0.86M parameters: learns indentation and keywords in minutes
  c.model.num_heads = 4
  c.model.d_model = 128
  c.model.max_len = 256  # = seq_len: no sampling past the trained positions
  c.model.pos_encoding = 'rotary'  # relative positions: code repeats at any offset
  c.batch_size = 8  # 2,048 tokens per step
  c.num_train_steps = 1500  # about 3M tokens: three minutes on 2 CPU cores
  c.steps_per_dispatch = 10  # a small step on CPU pays a visible per-dispatch overhead
  c.log_every_steps = 100
  c.eval_every_steps = 500
  c.eval_batches = 20  # 20 x 8 x 256 bytes of held-out files per evaluation
  c.checkpoint_every_steps = 500
  c.optim.learning_rate = 2e-3  # small model, short run: a high peak pays off
  c.optim.min_learning_rate = 2e-4  # peak / 10 at the end of the cosine
  c.sample.prompt = 'def '
  c.sample.max_new_tokens = 250
  c.sample.temperature = 0.7  # a little sharper than the model, for readable code
  return c
