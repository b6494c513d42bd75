"""Fine-tuning a Hugging Face GPT-2-architecture checkpoint (GPT-2 itself, DistilGPT-2, or
one exported by ar_jax.convert), imported as a run at step 0.

  python -m ar_jax.convert --from_hf=DIR --workdir=workdirs/gpt2_ft
  python -m ar_jax.main --config=experiments/hf_gpt2.py:hf=DIR --workdir=workdirs/gpt2_ft
  python -m ar_jax.sample --workdir=workdirs/gpt2_ft --prompt='def main():'

Arg keys: hf=DIR (required: its config.json sets the model, its tokenizer.json the tokens),
data=PATH (a directory, file or glob of text, JSONL or Parquet files; default the embedded
corpus of Python source). The config itself is ar_jax.hf.experiment_config's, which
ar_jax.convert --from_hf uses when given no --config; an import with other config overrides
must be trained with the same ones.
"""

from ar_jax.config import parse_arg
from ar_jax.errors import check
from ar_jax.interop import hf


def get_config(arg: str | None = None):
  args = parse_arg(arg, {'hf': None, 'data': None})
  check(args['hf'], 'experiments/hf_gpt2.py needs hf=DIR, a Hugging Face model directory')
  return hf.experiment_config(args['hf'], args['data'])
