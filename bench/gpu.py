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

from bench import torch_models  # noqa: E402
from bench.timing import ar_jax_config, ar_jax_rate  # noqa: E402

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
  steps: int = 20
  matmul: int = 8192
  lstm: tuple[int, int, int] = (1024, 64, 256)  # width, batch, sequence
  decode_tokens: int = 256
  # (scan_layers, remat) pairs tried at every batch.
  variants: tuple[tuple[bool, str], ...] = tuple(
    (scan, remat) for scan in (True, False) for remat in ('none', REMAT)
  )


TINY = Sizes(2, 2, 64, 512, 64, (2,), 2, 256, (32, 2, 16), 8, ((True, 'none'), (False, REMAT)))


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
  """(batch, remat, scan, tokens/s, step ms, MFU) of every variant that fits."""
  from ar_jax import models

  rows = []
  for scan, remat in s.variants:
    for batch in s.batches:
      c = gpt2_config(s, batch, remat, scan)
      try:
        rate = ar_jax_rate(c, s.steps, 1, repeats)
      except Exception as e:  # out of memory at this batch: the larger ones will not fit
        print(f'  batch {batch}, remat {remat}, scan {scan}: {type(e).__name__}')
        break
      flops = 3 * models.size(c.model, s.vocab, s.context)[1]
      rows.append((batch, remat, scan, rate, 1e3 * batch * s.context / rate, rate * flops / peak))
  return rows


def decoding_rate(s: Sizes, batch: int) -> float:
  """New tokens/s of cached greedy decoding from random GPT-2 parameters, one-token prompt."""
  import jax
  import jax.numpy as jnp

  from ar_jax import decoding, models

  c = gpt2_config(s, 1, 'none', True)
  model = models.get_model(c.model, s.vocab)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  prompt = jnp.zeros((batch, 1), jnp.int32)
  run = lambda: (
    decoding.generate(
      model, params, prompt, s.decode_tokens, jax.random.key(0), temperature=0.0
    ).tokens
  )
  jax.block_until_ready(run())
  start = time.perf_counter()
  jax.block_until_ready(run())
  return batch * s.decode_tokens / (time.perf_counter() - start)


def bench():
  import jax

  f = flags.FLAGS
  s, repeats = (TINY, 1) if f.tiny else (Sizes(), f.repeats)
  peak = f.peak_tflops * 1e12
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}')
  rate = matmul_rate(s.matmul, repeats)
  print(f'bf16 matmul {s.matmul}^3: {rate:.3g} TFLOP/s measured, {f.peak_tflops:.0f} datasheet')
  print(f'GPT-2 ({s.layers} layers, d {s.d_model}, context {s.context}), bf16, AdamW:')
  print('  batch  remat                             scan   tokens/s   step ms    MFU')
  rows = gpt2_rows(s, peak, repeats)
  for batch, remat, scan, tps, ms, mfu in rows:
    print(f'  {batch:5d}  {remat:32s}  {scan!s:5s}  {tps:9,.0f}  {ms:8.1f}  {mfu:5.1%}')
  best = max(rows, key=lambda r: r[3])
  if not f.tiny:
    theirs = torch_models.gpt2_rate(s, best[0], repeats)
    print(
      f'  PyTorch at batch {best[0]}: {theirs:,.0f} tokens/s; '
      f'ar_jax / PyTorch {best[3] / theirs:.2f}x'
    )
  width, batch, seq = s.lstm
  text = os.path.join(tempfile.mkdtemp(), 'chars.txt')
  with open(text, 'w') as out:
    out.write(''.join(chr(32 + i % 65) for i in range(20_000)))
  c = ar_jax_config('lstm', batch, seq, 'bfloat16', text)
  c.model.d_hidden, c.mesh.data = width, 1
  ours = ar_jax_rate(c, s.steps, 1, repeats)
  line = f'LSTM 2 x {width}, batch {batch}, sequence {seq}, bf16: {ours:,.0f} tokens/s'
  if not f.tiny:
    theirs = torch_models.lstm_gpu_rate(width, batch, seq, s.steps, repeats)
    line += f'; torch.nn.LSTM (cuDNN) {theirs:,.0f}; ratio {ours / theirs:.2f}x'
  print(line)
  for b in (1, 64 if not f.tiny else 2):
    print(f'decoding, KV cache, batch {b}: {decoding_rate(s, b):,.0f} new tokens/s')


def main(argv):
  del argv
  from ar_jax import cli

  cli.run(bench)


if __name__ == '__main__':
  app.run(main)
