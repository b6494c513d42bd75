"""Tokenize a corpus once into a token store that runs stream from disk:

  python -m ar_jax.prepare --config=experiments/X.py[:ARG] --out=DIR [--num_workers=N]

The store holds config.data's training and eval splits, tokenized by config.data's tokenizer
(trained on the training split first when it is a subword one without a file). A run reads
it with --config.data.prepared=DIR. Killed at any point and started again with the same
arguments, it finishes without redoing the shards it wrote (ar_jax/data/store.py).
"""

import os

from absl import app, flags
from ml_collections import config_flags

from ar_jax import cli
from ar_jax.data import store

config_flags.DEFINE_config_file('config', None, 'experiments/NAME.py[:ARG]', lock_config=True)
flags.DEFINE_string('out', None, 'The store directory to write (or to finish).')
flags.DEFINE_integer(
  'num_workers', os.cpu_count() or 1, 'Processes that tokenize shards in parallel.'
)
flags.DEFINE_float(
  'shard_mb', store.SHARD_BYTES / 2**20, 'Text per shard, in MiB (part of the store spec).'
)
flags.mark_flags_as_required(['config', 'out'])


def _main():
  f = flags.FLAGS
  manifest = store.prepare(
    f.config.data, f.out, num_workers=f.num_workers, shard_bytes=int(f.shard_mb * 2**20)
  )
  for split, s in manifest['splits'].items():
    print(
      f'{split}: {s["tokens"]} tokens, {s["documents"]} documents, {s["bytes"]} bytes of text, '
      f'{len(s["shards"])} shards, longest document {s["longest_document"]} tokens'
      + (f', {s["skipped_documents"]} left out (not UTF-8)' if s['skipped_documents'] else '')
    )
  print(f'train on it with --config.data.prepared={f.out}')


def main(argv):
  del argv
  cli.run(_main)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
