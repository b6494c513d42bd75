"""Generation speed on CPU: the transformer with its KV cache against recomputing the whole
prefix for every new token (what nanoGPT's generate does), and the recurrent family's step.

  python bench/generation.py [--repeats=3] [--new_tokens=256,1024] [--batch_sizes=1,16]

Greedy decoding of a 16-token prompt by a 4-layer transformer (d_model 128, 4 heads, vocab
256, context 1,040), untrained: speed does not depend on the weights. Tokens/s counts new
tokens of the whole batch; each time is the median of --repeats runs after a warm-up
(compilation excluded). Target: the cache >= 10x faster at 1,024 new tokens.

The uncached baseline runs the model's full forward once per new token, on the prefix
rounded up to a multiple of 64 positions (one compiled loop per width, as XLA wants static
shapes; causal attention makes the padding harmless): at most 63 positions more than
nanoGPT's exact prefix, and logits at every position where nanoGPT takes the last only. Both
make it somewhat slower than nanoGPT's own loop would be here; the ratio is an upper estimate
by that margin. A full uncached run at batch 16 and 1,024 tokens takes minutes here, so its
time is measured per width: SAMPLE_STEPS steps at each width, times the steps that width
serves (every step at one width does the same work). The bench first checks that the
baseline reproduces the cached tokens.
"""

import functools
import os
import pathlib
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ar_jax import cli, decode, models  # noqa: E402
from ar_jax.errors import check  # noqa: E402

flags.DEFINE_integer('repeats', 3, 'Timed runs per figure; the median is printed.')
flags.DEFINE_list('new_tokens', ['256', '1024'], 'New tokens per prompt.')
flags.DEFINE_list('batch_sizes', ['1', '16'], 'Prompts decoded together.')

PROMPT_LEN, VOCAB, WIDTH_STEP, SAMPLE_STEPS = 16, 256, 64, 2
TRANSFORMER = dict(name='transformer', num_layers=4, num_heads=4, d_model=128, max_len=1040)


def init(model_config: dict):
  """A model of config.model = model_config (the family's defaults for fields it omits)."""
  model = models.get_model(ml_collections.ConfigDict(model_config), VOCAB)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, PROMPT_LEN), jnp.int32))
  return model, nn.unbox(params['params'])


def median_seconds(run, repeats: int):
  """(median seconds of run() over repeats, after a warm-up that compiles; its output)."""
  jax.block_until_ready(run())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times), out


@functools.partial(jax.jit, static_argnames=('model', 'width'))
def _uncached_steps(model, params, tokens_BL, start, stop, *, width):
  """Positions start..stop-1, each the argmax of a full forward over the first width ones."""

  def step(t, tokens_BL):
    logits_BTV = model.apply({'params': params}, tokens_BL[:, :width])
    next_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BTV, t - 1, 1, False), -1)
    return tokens_BL.at[:, t].set(next_B.astype(tokens_BL.dtype))

  return jax.lax.fori_loop(start, stop, step, tokens_BL)


def _widths(P: int, L: int):
  """(start, stop, width): positions start..stop-1 need at most width tokens before them."""
  t = P
  while t < L:
    width = min(-(-t // WIDTH_STEP) * WIDTH_STEP, L)
    yield t, min(width + 1, L), width
    t = min(width + 1, L)


def uncached_generate(model, params, prompts_BP, max_new_tokens: int):
  """nanoGPT's generate: no cache, the whole prefix through the model for every new token."""
  P = prompts_BP.shape[1]
  tokens_BL = jnp.pad(prompts_BP, ((0, 0), (0, max_new_tokens)))
  for start, stop, width in _widths(P, P + max_new_tokens):
    tokens_BL = _uncached_steps(model, params, tokens_BL, start, stop, width=width)
  return tokens_BL


def uncached_seconds(model, params, prompts_BP, max_new_tokens: int, repeats: int) -> float:
  """The time uncached_generate takes, from SAMPLE_STEPS of its steps at each width (median
  of repeats) times the steps that width serves: every step at one width does the same work."""
  P = prompts_BP.shape[1]
  tokens_BL = jnp.pad(prompts_BP, ((0, 0), (0, max_new_tokens)))
  total = 0.0
  for start, stop, width in _widths(P, P + max_new_tokens):
    steps = min(SAMPLE_STEPS, stop - start)
    run = functools.partial(
      _uncached_steps, model, params, tokens_BL, start, start + steps, width=width
    )
    total += median_seconds(run, repeats)[0] * (stop - start) / steps
  return total


def cached_generate(model, params, prompts_BP, max_new_tokens: int):
  return decode.generate(
    model, params, prompts_BP, max_new_tokens, jax.random.key(0), temperature=0.0
  ).tokens


def bench():
  f = flags.FLAGS
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores')
  print(f'transformer {TRANSFORMER}, vocab {VOCAB}, prompt {PROMPT_LEN} tokens, greedy')
  model, params = init(TRANSFORMER)
  prompts = jax.random.randint(jax.random.key(1), (1, PROMPT_LEN), 0, VOCAB)
  cached = cached_generate(model, params, prompts, 64)
  check(
    bool((cached == uncached_generate(model, params, prompts, 64)).all()),
    'the uncached baseline does not reproduce the cached tokens',
  )
  for new in map(int, f.new_tokens):
    for batch in map(int, f.batch_sizes):
      prompts = jax.random.randint(jax.random.key(1), (batch, PROMPT_LEN), 0, VOCAB)
      run = functools.partial(cached_generate, model, params, prompts, new)
      cached = batch * new / median_seconds(run, f.repeats)[0]
      uncached = batch * new / uncached_seconds(model, params, prompts, new, f.repeats)
      print(
        f'{new:5d} new tokens, batch {batch:2d}: kv cache {cached:9,.0f} tokens/s, '
        f'uncached {uncached:7,.0f} tokens/s, ratio {cached / uncached:6.1f}x'
      )

  if 'rnn' not in models.available():
    print('recurrent family: ar_jax/models/rnn.py is not there yet; skipped')
    return
  model, params = init({'name': 'rnn'})
  print(f'recurrent family, its default config: {model.config}')
  for new in map(int, f.new_tokens):
    for batch in map(int, f.batch_sizes):
      prompts = jax.random.randint(jax.random.key(1), (batch, PROMPT_LEN), 0, VOCAB)
      run = functools.partial(cached_generate, model, params, prompts, new)
      rate = batch * new / median_seconds(run, f.repeats)[0]
      print(f'{new:5d} new tokens, batch {batch:2d}: cached step {rate:9,.0f} tokens/s')


def main(argv):
  del argv
  cli.run(bench)


if __name__ == '__main__':
  app.run(main)
