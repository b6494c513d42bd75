"""Hugging Face interop for the transformer: a GPT-2-architecture checkpoint in as a new run,
and a run out as a Hugging Face directory.

  pip install -e '.[hf]'
  python -m ar_jax.convert --from_hf=DIR --workdir=RUN [--config=experiments/hf_gpt2.py:hf=DIR]
  python -m ar_jax.main --config=experiments/hf_gpt2.py:hf=DIR --workdir=RUN   # fine-tunes
  python -m ar_jax.convert --to_hf=OUT --workdir=RUN

--from_hf reads DIR's config.json, its weights (model.safetensors, sharded safetensors, or a
pytorch_model.bin read with weights_only=True, which needs PyTorch) and its tokenizer.json,
and writes RUN as ar_jax.main would have at step 0 (config.json, tokenizer.json, a
checkpoint with a fresh optimizer state): it trains, evaluates and samples like any run.
--to_hf writes OUT/config.json, OUT/model.safetensors and the run's tokenizer.json (a
byte-level BPE run's; another tokenizer is written as ar_jax_tokenizer.json), which
transformers.AutoModelForCausalLM.from_pretrained(OUT) loads. It writes a new folder beside
OUT and renames it at the end, so OUT is never half written; an OUT that is not empty is
refused unless --overwrite, and a run directory always is.
"""

from absl import app, flags
from ml_collections import config_flags

from ar_jax import cli
from ar_jax.errors import check
from ar_jax.interop import hf

flags.DEFINE_string('from_hf', None, 'A Hugging Face GPT-2-architecture model directory to import.')
flags.DEFINE_string('to_hf', None, 'A directory to export the run to, for Hugging Face.')
flags.DEFINE_string('workdir', None, 'The run: written by --from_hf, read by --to_hf.')
flags.DEFINE_bool(
  'overwrite', False, '--to_hf: replace a folder that is not empty (never a run directory).'
)
config_flags.DEFINE_config_file(
  'config',
  None,
  '--from_hf: the run config (default: ar_jax.hf.experiment_config(DIR), which '
  'experiments/hf_gpt2.py:hf=DIR gives too).',
)


def _main():
  f = flags.FLAGS
  check(f.workdir, '--workdir is required')
  check(bool(f.from_hf) != bool(f.to_hf), 'give exactly one of --from_hf=DIR (import), --to_hf=DIR')
  if f.to_hf:
    hf.export_run(f.workdir, f.to_hf, overwrite=f.overwrite)
    print(f'wrote {f.to_hf}: config.json, model.safetensors and the tokenizer')
    return
  config = f.config or hf.experiment_config(f.from_hf)
  hf.import_run(f.from_hf, config, f.workdir)
  print(f'wrote {f.workdir}: a run at step 0 with the weights of {f.from_hf}')


def main(argv):
  del argv
  cli.run(_main)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
