"""ar_jax against PyTorch on this CPU, side by side in one process, one right after the other.

  pip install -e '.[bench]'     # PyTorch, for this script only
  python bench/vs_pytorch.py [--repeats=3] [--text=PATH] [--tiny]

The same models at the same shapes, on the same random tokens, with the same optimizer
(AdamW, global-norm clipping): a GPT of nanoGPT's architecture at the nanogpt_cpu preset's
sizes (no biases, tied embedding, learned positions, tanh GELU as ar_jax's), the LSTM and GRU
language models at 2 x 512, and the plain causal-conv stack of shakespeare_char.py's
model=conv. Each is timed over the same steps after the same warm-up, medians of
--repeats, in training tokens/s; the ratio is ar_jax / PyTorch. ar_jax runs through its
own trainer (the compiled step of train.Trainer); PyTorch runs eagerly, as nanoGPT does on a
CPU, with its fastest AdamW (fused where this build has it). bfloat16 rows are ar_jax's
model.dtype=bfloat16 (bf16 matmul operands, float32 accumulation, parameters and loss)
against its own float32.

End to end: the nanogpt_cpu recipe on tiny shakespeare (--text, char-rnn's input.txt),
start-up, compiles, 2,000 steps, its exact full-split evaluations, checkpoints and final
sample included, as `python -m ar_jax.main` (float32, then model.dtype=bfloat16) against a
PyTorch script doing the same work (`--torch_recipe`), each in a fresh process, ar_jax's
with an empty compilation cache.

--tiny runs the ar_jax half alone at small shapes, in seconds (the test suite runs it, so
this script cannot rot without a failing test).
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import torch_models  # noqa: E402
from bench.timing import ar_jax_config, ar_jax_rate, cpu_model  # noqa: E402

flags.DEFINE_integer('repeats', 3, 'Timed repeats of each measurement (median).')
flags.DEFINE_string(
  'text',
  str(REPO.parent / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'),
  'Tiny shakespeare (char-rnn input.txt) for the end-to-end comparison.',
)
flags.DEFINE_bool('tiny', False, 'The ar_jax half only, at small shapes: a smoke test.')
flags.DEFINE_bool('torch_recipe', False, 'Internal: run the PyTorch end-to-end recipe.')
flags.DEFINE_string('workdir', '', 'Internal: where --torch_recipe writes.')

# (name, shakespeare_char model arg, batch, sequence, steps timed, steps per dispatch)
WORKLOADS = (
  ('gpt', 'transformer', 12, 64, 200, 10),
  ('lstm', 'lstm', 32, 128, 40, 4),
  ('gru', 'gru', 32, 128, 40, 4),
  ('conv', 'conv', 12, 64, 200, 10),
)
TINY = (('gpt', 'transformer', 4, 16, 4, 2),)  # bench/gpu.py --tiny runs the LSTM's path


def throughput(text: str, repeats: int, tiny: bool) -> None:
  print(f'training tokens/s ({cpu_model()}; medians of {repeats}):')
  print(
    f'  {"model":6s} {"shape":>9s} {"PyTorch f32":>12s} {"ar_jax f32":>11s} {"ratio":>6s}'
    f' {"ar_jax bf16":>12s} {"bf16/f32":>8s}'
  )
  for name, model, B, T, steps, k in TINY if tiny else WORKLOADS:
    ours = ar_jax_rate(ar_jax_config(model, B, T, 'float32', text), steps, k, repeats)
    bf16 = ar_jax_rate(ar_jax_config(model, B, T, 'bfloat16', text), steps, k, repeats)
    theirs = None if tiny else torch_models.rate(name, B, T, steps, repeats)
    ratio = f'{ours / theirs:5.2f}x' if theirs else '     -'
    their_text = f'{theirs:12,.0f}' if theirs else f'{"-":>12s}'
    print(
      f'  {name:6s} {f"{B}x{T}":>9s} {their_text} {ours:11,.0f} {ratio}'
      f' {bf16:12,.0f} {bf16 / ours:7.2f}x'
    )


def end_to_end(text: str) -> None:
  """Wall seconds of the nanogpt_cpu recipe: the PyTorch script, then ar_jax's CLI in float32
  and in bfloat16, each in a fresh process with an empty compilation cache."""
  if not os.path.exists(text):
    print(f'end to end: skipped, no {text}')
    return
  ours = [
    sys.executable,
    '-m',
    'ar_jax.main',
    f'--config=experiments/shakespeare_char.py:preset=nanogpt_cpu,text={text}',
    '--config.model.pos_encoding=learned',
  ]
  runs = {
    'PyTorch': [sys.executable, __file__, '--torch_recipe', f'--text={text}'],
    'ar_jax': ours,
    'ar_jax bf16': [*ours, '--config.model.dtype=bfloat16'],
  }
  results = {}
  for name, command in runs.items():
    workdir = tempfile.mkdtemp()
    env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': tempfile.mkdtemp()}  # a first run's
    start = time.perf_counter()
    out = subprocess.run(
      [*command, f'--workdir={workdir}'], cwd=REPO, env=env, capture_output=True, text=True
    )
    if out.returncode:
      raise RuntimeError(f'{name} failed:\n{out.stderr[-3000:]}')
    results[name] = (time.perf_counter() - start, out.stdout.strip().splitlines()[-1])
  print('end to end, nanogpt_cpu recipe (2,000 steps, exact evaluations every 500, sample):')
  for name, (seconds, last) in results.items():
    ratio = results['PyTorch'][0] / seconds
    print(f'  {name:12s} {seconds:6.1f} s  PyTorch / this {ratio:4.2f}x   {last[:60]}')


def bench():
  f = flags.FLAGS
  if f.torch_recipe:
    torch_models.recipe(f.text, f.workdir)
    return
  text = f.text
  if f.tiny or not os.path.exists(text):  # throughput needs only the 65-character vocabulary
    text = os.path.join(tempfile.mkdtemp(), 'chars.txt')
    with open(text, 'w') as out:
      out.write(''.join(chr(32 + i % 65) for i in range(20_000)))
  throughput(text, 1 if f.tiny else f.repeats, f.tiny)
  if not f.tiny:
    end_to_end(f.text)


def main(argv):
  del argv
  from ar_jax import cli

  cli.run(bench)


if __name__ == '__main__':
  app.run(main)
