"""A small transformer on the Python standard library's own sources, byte level.

Needs no download and no accelerator: a few minutes on a 2-core CPU, ending with a sample
that reads like Python.

  python -m ar_jax.main --config=experiments/quickstart.py --workdir=workdirs/quickstart
"""

from ar_jax.config import defaults, parse_arg


def get_config(arg: str | None = None):
  parse_arg(arg, {})  # no variants: any arg is an error
  c = defaults()
  c.data.name = 'python_stdlib'  # every .py file of this interpreter's stdlib, split by file
  c.data.tokenizer = 'byte'
  c.data.seq_len = 128
  c.data.eval_splits = ('validation',)
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.d_model = 128
  c.model.max_len = 256  # room for the prompt and the sample after training on 128
  c.model.pos_encoding = 'rotary'  # relative positions: code repeats at any offset
  c.batch_size = 16
  c.num_train_steps = 1500
  c.steps_per_dispatch = 10
  c.log_every_steps = 100
  c.eval_every_steps = 500
  c.eval_batches = 20  # 20 x 16 x 128 tokens of held-out files per evaluation
  c.checkpoint_every_steps = 500
  c.optim.learning_rate = 2e-3
  c.optim.min_learning_rate = 2e-4
  c.sample.prompt = 'def '
  c.sample.max_new_tokens = 250
  c.sample.temperature = 0.7
  return c
