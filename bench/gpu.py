"""One GPU: GPT-2 small trained at its best batch, with and without remat and scanned
layers, beside the same model in PyTorch; the LSTM beside cuDNN's; KV-cache decoding; and
the GPU's measured bf16 matmul rate beside its datasheet peak.

  pip install -e '.[bench]'     # PyTorch, for its half
  python bench/gpu.py [--peak_tflops=989] [--tiny]

GPT-2 124M: 12 layers, 12 heads, d_model 768, vocabulary 50,257, context 1,024, bf16 matmuls
(float32 parameters, AdamW), random tokens; MFU = 6 N-style training FLOPs per token
(the model's own count, attention included) x tokens/s / the datasheet peak (H200: 989
TFLOP/s dense bf16). PyTorch: nanoGPT's architecture (bench/torch_models.py), torch.compile,
bf16 autocast, fused AdamW, scaled_dot_product_attention (flash). The LSTM: 2 x 1,024,
batch 64, sequence 256, against torch.nn.LSTM (cuDNN).

--tiny runs every ar_jax code path at toy sizes on any device (the suite runs it on CPU) and
skips PyTorch.
"""

import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# JAX takes memory as it needs it, not 75% of the GPU up front: PyTorch runs in this process.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from ar_jax import platform  # noqa: E402
from bench import torch_models  # noqa: E402
from bench.timing import ar_jax_config, ar_jax_rate  # noqa: E402

platform.set_xla_defaults()  # before JAX starts: cuBLAS matmuls

flags.DEFINE_float('peak_tflops', 989.0, 'Datasheet dense bf16 peak of the GPU (H200: 989).')
flags.DEFINE_bool('tiny', False, 'Toy sizes, ar_jax only: a smoke test of every code path.')
flags.DEFINE_integer('repeats', 3, 'Timed repeats of each measurement (median).')


REMAT = 'dots_with_no_batch_dims_saveable'  # keeps the matmuls' outputs, recomputes the rest


@dataclasses.dataclass(frozen=True)
class Sizes:
  layers: int = 12
  heads: int = 12
  d_model: int = 768
  vocab: int = 50_257
  context: int = 1024
  batches: tuple[int, ...] = (8, 16, 32)
  steps: int = 10
  matmul: int = 8192
  lstm: tuple[int, int, int] = (1024, 64, 256)  # width, batch, sequence
  decode_tokens: int = 256
  # (scan_layers, remat): the first at every batch, the others at its best one.
  variants: tuple[tuple[bool, str], ...] = ((True, 'none'), (True, REMAT), (False, 'none'))


TINY = Sizes(2, 2, 64, 512, 64, (2,), 2, 256, (32, 2, 16), 8, ((False, REMAT),))


def matmul_rate(n: int, repeats: int) -> float:
  """Measured bf16 x bf16 -> float32 matmul TFLOP/s at n x n x n."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
  f(a, a).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(10):
      out = f(a, a)
    out.block_until_ready()
    times.append((time.perf_counter() - start) / 10)
  return 2 * n**3 / statistics.median(times) / 1e12


def gpt2_config(s: Sizes, batch: int, remat: str, scan: bool):
  from experiments import gpt2_small

  c = gpt2_small.get_config()
  c.model.num_layers, c.model.num_heads, c.model.d_model = s.layers, s.heads, s.d_model
  c.model.max_len = c.data.seq_len = s.context
  c.data.vocab_size = s.vocab
  c.model.remat, c.model.scan_layers = remat, scan
  c.batch_size, c.grad_accum_steps, c.mesh.data = batch, 1, 1
  return c


def gpt2_rows(s: Sizes, peak: float, repeats: int):
  """(batch, remat, scan, tokens/s, step ms, MFU): the first variant at every batch that
  fits, then the other variants at its best batch."""
  from ar_jax import models

  def row(batch, scan, remat):
    c = gpt2_config(s, batch, remat, scan)
    rate = ar_jax_rate(c, s.steps, 1, repeats)
    flops = 3 * models.size(c.model, s.vocab, s.context)[1]
    return batch, remat, scan, rate, 1e3 * batch * s.context / rate, rate * flops / peak

  (scan, remat), *others = s.variants
  rows = []
  for batch in s.batches:
    try:
      rows.append(row(batch, scan, remat))
    except Exception as e:  # out of memory at this batch: the larger ones will not fit
      print(f'  batch {batch}: {type(e).__name__}: {str(e).splitlines()[0][:120]}')
      break
  best = max(rows, key=lambda r: r[3])[0]
  return rows + [row(best, scan, remat) for scan, remat in others]


def decoding_rate(s: Sizes, batch: int) -> float:
  """New tokens/s of cached greedy decoding from random GPT-2 parameters, one-token prompt."""
  import jax
  import jax.numpy as jnp

  from ar_jax import decode, models

  c = gpt2_config(s, 1, 'none', True)
  model = models.get_model(c.model, s.vocab)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  prompt = jnp.zeros((batch, 1), jnp.int32)
  run = lambda: (
    decode.generate(
      model, params, prompt, s.decode_tokens, jax.random.key(0), temperature=0.0
    ).tokens
  )
  jax.block_until_ready(run())
  start = time.perf_counter()
  jax.block_until_ready(run())
  return batch * s.decode_tokens / (time.perf_counter() - start)


def breakdown(s: Sizes, batch: int, repeats: int) -> str:
  """Milliseconds of GPT-2's forward loss and of forward + backward at one batch, to set
  against the whole train step's: where a step's time goes (the optimizer is the rest)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ar_jax import models, objectives

  c = gpt2_config(s, batch, 'none', True)
  model = models.get_model(c.model, s.vocab)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, s.vocab, (batch, s.context + 1)))
  params = jax.jit(model.init)(jax.random.key(0), tokens[:1, :8])['params']

  def loss(p):
    total, count = objectives.cross_entropy(
      model.apply({'params': p}, tokens[:, :-1]), tokens[:, 1:]
    )
    return total / count

  times = {}
  for name, f in (('forward', jax.jit(loss)), ('forward + backward', jax.jit(jax.grad(loss)))):
    jax.block_until_ready(f(params))
    runs = []
    for _ in range(repeats):
      start = time.perf_counter()
      for _ in range(s.steps):
        out = f(params)
      jax.block_until_ready(out)
      runs.append(1e3 * (time.perf_counter() - start) / s.steps)
    times[name] = statistics.median(runs)
  return ', '.join(f'{k} {v:.1f} ms' for k, v in times.items())


def bench():
  import jax

  f = flags.FLAGS
  s, repeats = (TINY, 1) if f.tiny else (Sizes(), f.repeats)
  peak = f.peak_tflops * 1e12

  def section(name, fn):
    """Runs one part; on the GPU a part that fails is reported and the others still run
    (the machine's minutes are few), while --tiny lets the failure through to its test."""
    if f.tiny:
      return fn()
    try:
      return fn()
    except Exception as e:  # noqa: BLE001 - reported, and the next part runs
      print(f'{name}: failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}')

  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}')
  rate = section('matmul', lambda: matmul_rate(s.matmul, repeats)) or float('nan')
  print(f'bf16 matmul {s.matmul}^3: {rate:.3g} TFLOP/s measured, {f.peak_tflops:.0f} datasheet')
  print(f'GPT-2 ({s.layers} layers, d {s.d_model}, context {s.context}), bf16, AdamW:')
  print('  batch  remat                             scan   tokens/s   step ms    MFU')
  rows = gpt2_rows(s, peak, repeats)
  for batch, remat, scan, tps, ms, mfu in rows:
    print(f'  {batch:5d}  {remat:32s}  {scan!s:5s}  {tps:9,.0f}  {ms:8.1f}  {mfu:5.1%}')
  best = max(rows, key=lambda r: r[3])
  print(f'  at batch {best[0]}: {section("breakdown", lambda: breakdown(s, best[0], repeats))}')
  if not f.tiny:
    theirs = section('PyTorch GPT-2', lambda: torch_models.gpt2_rate(s, best[0], repeats))
    if theirs:
      print(
        f'  PyTorch at batch {best[0]}: {theirs:,.0f} tokens/s; ar_jax / PyTorch '
        f'{best[3] / theirs:.2f}x'
      )
  section('LSTM', lambda: print(lstm_line(s, repeats, f.tiny)))
  for b in (1,) if f.tiny else (1, 64):
    section(
      'decoding',
      lambda b=b: print(f'decoding, KV cache, batch {b}: {decoding_rate(s, b):,.0f} new tokens/s'),
    )


def lstm_line(s: Sizes, repeats: int, tiny: bool) -> str:
  width, batch, seq = s.lstm
  text = os.path.join(tempfile.mkdtemp(), 'chars.txt')
  with open(text, 'w') as out:
    out.write(''.join(chr(32 + i % 65) for i in range(20_000)))
  c = ar_jax_config('lstm', batch, seq, 'bfloat16', text)
  c.model.d_hidden, c.mesh.data = width, 1
  ours = ar_jax_rate(c, s.steps, 1, repeats)
  line = f'LSTM 2 x {width}, batch {batch}, sequence {seq}, bf16: {ours:,.0f} tokens/s'
  if not tiny:
    theirs = torch_models.lstm_gpu_rate(width, batch, seq, s.steps, repeats)
    line += f'; torch.nn.LSTM (cuDNN) {theirs:,.0f}; ratio {ours / theirs:.2f}x'
  return line


def main(argv):
  del argv
  from ar_jax import cli

  cli.run(bench)


if __name__ == '__main__':
  app.run(main)
