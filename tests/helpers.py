"""Helpers the tests share (no side effects: a config file may import this)."""

import json
import pathlib

from ar_jax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(path: pathlib.Path | str = '', **overrides):
  """A transformer small enough to compile and train in seconds, on data.path, one device."""
  c = config_lib.defaults()
  c.data.name = 'files'
  c.data.path = str(path)
  c.data.tokenizer = 'char'
  c.data.seq_len = 16
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.d_model = 16
  c.model.max_len = 32
  c.batch_size = 8
  c.num_train_steps = 6
  c.log_every_steps = 2
  c.eval_every_steps = 3
  c.eval_batches = 2
  c.checkpoint_every_steps = 3
  c.optim.warmup_steps = 1
  c.mesh.data = 1
  c.sample.max_new_tokens = 8
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def read_jsonl(path) -> list[dict]:
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
