"""Continue a prompt with the latest checkpoint of a workdir, through the model's cache.

  python -m ar_jax.sample --workdir=DIR --prompt=TEXT --max_new_tokens=200 \
      --temperature=0.8 --top_k=40 --seed=0
"""

import json
import os

import jax
import ml_collections
from absl import app, flags

from ar_jax import checkpoint, cli, decoding, models, optim, sharding, train
from ar_jax.data import tokenizers
from ar_jax.errors import check

flags.DEFINE_string('workdir', None, 'A run directory written by ar_jax.main.')
flags.DEFINE_string('prompt', '\n', 'Text to continue.')
flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate after the prompt.')
flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy decoding.')
flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.')
flags.DEFINE_float('top_p', 1.0, 'Sample among the smallest set of probability >= p; 1 = all.')
flags.DEFINE_integer('seed', 0, 'Random seed for sampling.')
flags.mark_flag_as_required('workdir')


def load(workdir: str):
  """(model, params, tokenizer, step) from a workdir's config, tokenizer and latest checkpoint."""
  config_path = os.path.join(workdir, 'config.json')
  check(os.path.exists(config_path), f'{workdir} is not a run directory: it has no config.json')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokenizer = tokenizers.load(os.path.join(workdir, 'tokenizer.json'))
  model = models.get_model(config.model, tokenizer.vocab_size)
  tx = optim.make_optimizer(config.optim, config.num_train_steps)
  # One device holds the whole model for sampling, whatever mesh the run trained on.
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1})
  abstract, _ = train.abstract_state(model, tx, mesh, config)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  step = ckpt.latest_step()
  check(step is not None, f'workdir {workdir} has no checkpoint yet')
  state, _, _ = ckpt.restore(step, abstract)
  ckpt.close()
  return model, state.params, tokenizer, step


def _main():
  f = flags.FLAGS
  model, params, tokenizer, _ = load(f.workdir)
  prompt = tokenizer.encode(f.prompt)
  tokens = decoding.generate(
    model,
    params,
    prompt[None, :],
    f.max_new_tokens,
    jax.random.key(f.seed),
    temperature=f.temperature,
    top_k=f.top_k,
    top_p=f.top_p,
  )
  print(tokenizer.decode(tokens[0].tolist()))


def main(argv):
  del argv
  cli.run(_main)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
