"""Continue prompts with the latest checkpoint of a workdir, through the model's cache.

  python -m ar_jax.sample --workdir=DIR --prompt=TEXT --max_new_tokens=200 \
      --temperature=0.8 --top_k=40 --seed=0
  python -m ar_jax.sample --workdir=DIR --prompts_file=prompts.txt --beam_size=4 \
      --num_samples=2 --output=beams.jsonl

A row stops at the tokenizer's end-of-sequence token, when it has one. --output writes one
JSON object per continuation: prompt, sample (its rank for beam search), completion, tokens
and their log_probs under the model, log_prob (their sum) and score (beam search: log_prob
divided by the length penalty).
"""

import json
import os

import jax
import numpy as np
from absl import app, flags

from ar_jax import cli, decode, workdir
from ar_jax.data.sources import decode_utf8
from ar_jax.errors import check

flags.DEFINE_string('workdir', None, 'A run directory written by ar_jax.main.')
flags.DEFINE_string('prompt', '\n', 'Text to continue.')
flags.DEFINE_string('prompts_file', None, 'Continue each line of this file instead of --prompt.')
flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate after each prompt.', lower_bound=1)
flags.DEFINE_float('temperature', 0.8, 'Softmax temperature; 0 is greedy decoding.')
flags.DEFINE_integer('top_k', 0, 'Sample among the k most likely tokens; 0 = all.', lower_bound=0)
flags.DEFINE_float('top_p', 1.0, 'Sample among the smallest set of probability >= p; 1 = all.')
flags.DEFINE_integer(
  'beam_size',
  1,
  'Above 1: beam search of this width (the sampling flags do not apply).',
  lower_bound=1,
)
flags.DEFINE_float('length_penalty', 0.6, 'Beam search: the exponent alpha; 0 ranks by log p.')
flags.DEFINE_enum(
  'length_penalty_kind',
  'gnmt',
  ['gnmt', 'hf'],
  "Beam search: divide log p by GNMT's ((5 + length) / 6)^alpha or Hugging Face's length^alpha.",
)
flags.DEFINE_bool(
  'early_stopping',
  False,
  'Beam search: stop a prompt at its first --beam_size finished hypotheses (Hugging Face '
  'early_stopping=True), not once no unfinished beam can beat them (exact).',
)
flags.DEFINE_integer(
  'num_samples',
  1,
  'Continuations per prompt: samples, or the best beams (<= --beam_size).',
  lower_bound=1,
)
flags.DEFINE_integer('seed', 0, 'Random seed for sampling.')
flags.DEFINE_string('output', None, 'Also write the continuations to this JSONL file.')
flags.mark_flag_as_required('workdir')


def read_prompts(prompt: str, prompts_file: str | None) -> list[str]:
  """The prompt, or every line of prompts_file."""
  if prompts_file is None:
    return [prompt]
  check(os.path.isfile(prompts_file), f'--prompts_file={prompts_file} is not a file')
  with open(prompts_file, 'rb') as f:
    prompts = decode_utf8(
      f.read(), f'--prompts_file={prompts_file}', 'save it as UTF-8'
    ).splitlines()
  check(bool(prompts), f'--prompts_file={prompts_file} has no lines')
  return prompts


def continuations(f: flags.FlagValues, model, params, tokenizer, prompts: list[str]) -> list[dict]:
  """One record per continuation, num_samples per prompt in the prompts' order."""
  ids = [tokenizer.encode(p) for p in prompts]
  for i, row in enumerate(ids):
    check(len(row) > 0, f'prompt {i + 1} is empty: a prompt needs at least one token')
  lengths = [len(row) for row in ids]
  prompts_BP = np.zeros((len(ids), max(lengths)), np.int32)
  for b, row in enumerate(ids):
    prompts_BP[b, : len(row)] = row
  n_samples = f.num_samples
  common = dict(prompt_lengths=lengths, eos_id=tokenizer.eos_id)
  if f.beam_size > 1:
    check(n_samples <= f.beam_size, f'--num_samples={n_samples} exceeds --beam_size={f.beam_size}')
    out = decode.search(
      model,
      params,
      prompts_BP,
      f.max_new_tokens,
      beam_size=f.beam_size,
      length_penalty_alpha=f.length_penalty,
      length_penalty_kind=f.length_penalty_kind,
      early_stopping=f.early_stopping,
      **common,
    )
    out = jax.tree.map(lambda a: a[:, :n_samples], out)
  else:
    out = decode.generate(
      model,
      params,
      prompts_BP,
      f.max_new_tokens,
      jax.random.key(f.seed),
      temperature=f.temperature,
      top_k=f.top_k,
      top_p=f.top_p,
      num_samples=n_samples,
      **common,
    )
    out = jax.tree.map(lambda a: a.reshape(len(ids), n_samples, *a.shape[1:]), out)
  tokens, log_probs, ends, scores = jax.device_get(out)
  records = []
  for b, prompt in enumerate(prompts):
    for n in range(n_samples):
      new = slice(lengths[b], int(ends[b, n]))
      records.append(
        {
          'prompt': prompt,
          'sample': n,
          'text': tokenizer.decode(tokens[b, n, : new.stop]),
          'completion': tokenizer.decode(tokens[b, n, new]),
          'tokens': tokens[b, n, new].tolist(),
          'log_probs': log_probs[b, n, new].tolist(),
          'log_prob': float(log_probs[b, n, new].sum()),
          'score': float(scores[b, n]),
        }
      )
  return records


def _main():
  f = flags.FLAGS
  if f.output:
    folder = os.path.dirname(os.path.abspath(f.output))
    check(os.path.isdir(folder), f'--output={f.output}: folder {folder} does not exist')
  prompts = read_prompts(f.prompt, f.prompts_file)  # bad input fails before the model loads
  model, params, tokenizer, _ = workdir.load(f.workdir)
  records = continuations(f, model, params, tokenizer, prompts)
  for r in records:
    if len(records) > 1:
      print(f'=== prompt {r["prompt"]!r}, sample {r["sample"]}, score {r["score"]:.4f}')
    print(r['text'])
  if f.output:
    with open(f.output, 'w') as out:
      for r in records:
        out.write(json.dumps({k: v for k, v in r.items() if k != 'text'}) + '\n')


def main(argv):
  del argv
  cli.run(_main)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
