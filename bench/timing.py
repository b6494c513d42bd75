"""What the benchmarks share: the machine's name, ar_jax's training throughput through its
own trainer (bench/vs_pytorch.py on CPU, bench/gpu.py on a GPU, and the model benchmarks),
medians of timed calls, and decoding speed."""

import os
import pathlib
import platform
import statistics
import tempfile
import time

import numpy as np
from absl import flags

# tiny shakespeare in the shared data beside the repository (char-rnn's input.txt)
TEXT = pathlib.Path(__file__).resolve().parents[2] / 'shared/data/tinyshakespeare/input.txt'


def define_flags(tiny: str, corpus: bool = True) -> None:
  """The flags the benchmarks share: --repeats, --tiny, whose help is `tiny` (what the
  script shrinks), and, where models are built (corpus), --text: the corpus whose characters
  are the vocabulary."""
  flags.DEFINE_integer('repeats', 5, 'Timings per figure; the median is reported.')
  if corpus:
    flags.DEFINE_string('text', str(TEXT), "Corpus for the models' vocabulary.")
  flags.DEFINE_bool('tiny', False, f'{tiny}: checks that the script runs.')


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      name = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    name = platform.processor() or platform.machine()
  return f'{name}, {os.cpu_count()} cores'


def ar_jax_config(model: str, batch: int, seq_len: int, dtype: str, text: str):
  from experiments import shakespeare_char

  c = shakespeare_char.get_config(f'preset=nanogpt_cpu,model={model},text={text}')
  c.model.dtype = dtype
  if model == 'transformer':
    c.model.pos_encoding = 'learned'  # nanoGPT's
  c.batch_size, c.data.seq_len = batch, seq_len
  if 'max_len' in c.model:
    c.model.max_len = seq_len
  return c


def ar_jax_rate(config, steps: int, per_dispatch: int, repeats: int) -> float:
  """Training tokens/s of config's model through the trainer's compiled step, random tokens."""
  import jax

  from ar_jax import run as run_lib
  from ar_jax import state as state_lib
  from ar_jax import train

  config.steps_per_dispatch = per_dispatch
  # The model and its vocabulary alone: no split is tokenized (a subword vocabulary still to
  # be trained counts data.vocab_size tokens).
  run = run_lib.setup(config, tempfile.mkdtemp(prefix='vs_pytorch_'), train=False, evaluation=False)
  _, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, config)
  trainer = train.Trainer(run, shardings)
  state = train.init_state(run, shardings)
  B, T = config.batch_size, config.data.seq_len
  rng = np.random.default_rng(0)
  batches = rng.integers(0, run.tokenizer.vocab_size, (per_dispatch, B, T + 1), dtype=np.int32)
  for _ in range(2):  # compile, then one warm dispatch
    state, _ = trainer.train(state, batches)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps // per_dispatch):
      state, _ = trainer.train(state, batches)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  return steps // per_dispatch * per_dispatch * B * T / statistics.median(times)


def median_seconds(fn, repeats: int) -> float:
  """The median seconds of `repeats` calls of fn, after one that compiles."""
  import jax

  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def decoding_rate(config, new_tokens: int, repeats: int) -> float:
  """Greedy decoding's new tokens/s for config's model (65 characters): new_tokens after a
  one-token prompt (fewer where the model's context ends sooner), batch 1, from the cache."""
  import jax
  import jax.numpy as jnp

  from ar_jax import decode, models

  model = models.get_model(config.model, 65)
  new_tokens = min(new_tokens, model.max_len - 1) if model.max_len else new_tokens
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  prompt = jnp.zeros((1, 1), jnp.int32)

  def run():
    return decode.generate(
      model, params, prompt, new_tokens, jax.random.key(0), temperature=0.0
    ).tokens

  return new_tokens / median_seconds(run, repeats)
