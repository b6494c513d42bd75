"""Fine-tuning a Hugging Face GPT-2-architecture checkpoint (GPT-2 itself, DistilGPT-2, or
one exported by ar_jax.convert), imported as a run at step 0.

  python -m ar_jax.convert --from_hf=DIR --workdir=workdirs/gpt2_ft
  python -m ar_jax.main --config=experiments/hf_gpt2.py:hf=DIR --workdir=workdirs/gpt2_ft
  python -m ar_jax.sample --workdir=workdirs/gpt2_ft --prompt='def main():'

Arg keys: hf=DIR (required: its config.json sets the model, its tokenizer.json the tokens),
data=PATH (a directory, file or glob of text, JSONL or Parquet files; default the embedded
corpus of Python source). An import with other config overrides must be trained with the
same ones.
"""

from ar_jax import hf as hf_lib
from ar_jax.config import defaults, parse_arg
from ar_jax.errors import check


def get_config(arg: str | None = None):
  args = parse_arg(arg, {'hf': None, 'data': None})
  check(args['hf'], 'experiments/hf_gpt2.py needs hf=DIR, a Hugging Face model directory')
  hf = hf_lib.read_config(args['hf'])
  c = defaults()
  c.model.update(hf_lib.model_fields(hf))
  c.model.dropout = 0.0
  c.data.tokenizer = 'bpe'
  c.data.tokenizer_path = f'{args["hf"]}/tokenizer.json'
  c.data.invalid_utf8 = 'skip'  # BPE reads text: the embedded corpus's 4 non-UTF-8 files go
  if args['data']:
    c.data.name = 'files'
    c.data.path = args['data']
  c.data.seq_len = min(256, hf['n_positions'])
  # Fine-tuning: a small batch and learning rate, a short warmup, few steps.
  c.batch_size = 8
  c.num_train_steps = 500
  c.optim.learning_rate = 1e-4
  c.optim.min_learning_rate = 1e-5
  c.optim.warmup_steps = 50
  c.eval_every_steps = 250
  c.eval_batches = 20
  c.checkpoint_every_steps = 250
  return c
