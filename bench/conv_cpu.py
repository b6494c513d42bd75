"""The convolutional family on the 2-core CPU.

  python bench/conv_cpu.py [--pixelcnn_steps=500] [--bmnist_steps=2000]

1. WaveNet generation speed, Fast WaveNet (per-layer queues, O(layers) per sample) against
   naive recomputation (the full forward over a receptive field's worth of samples for every
   new one), at receptive fields 1,024 and 4,096: samples/s and their ratio. Kernel 2, one
   block of 10 or 12 dilated layers, 32 residual / 64 skip channels, 256 mu-law levels,
   batch 1. Both draw the same samples (tests/test_conv.py checks it).
2. PixelCNN bits/dim on the digits' 180 validation images after a fixed number of steps of
   experiments/pixelcnn.py (gated, its default digits preset), through the real trainer.
3. Binarized MNIST nats per test image, when a prepared TFDS copy is found (reference:
   PixelCNN 81.30, van den Oord et al. 2016); a short run, far from converged.
"""

import os
import pathlib
import statistics
import sys
import tempfile
import time

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
TFDS_DIR = REPO.parent / 'shared' / 'data' / 'tensorflow_datasets'
os.environ.setdefault('TFDS_DATA_DIR', str(TFDS_DIR))
sys.path.insert(0, str(REPO))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from ar_jax import cli, decode, models, train  # noqa: E402
from experiments import pixelcnn  # noqa: E402

flags.DEFINE_integer('pixelcnn_steps', 500, 'Training steps of the digits PixelCNN (part 2).')
flags.DEFINE_integer('bmnist_steps', 2000, 'Training steps on binarized MNIST (part 3).')
flags.DEFINE_integer('repeats', 3, 'Timed repeats of each generation measurement (median).')


def wavenet(layers: int):
  cfg = ml_collections.ConfigDict(
    dict(name='conv', layers_per_block=layers, channels=32, skip_channels=64, head_channels=64)
  )
  model = models.get_model(cfg, 256)
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']
  return model, nn.unbox(params)


def samples_per_second(fn, num_new: int) -> float:
  """Median rate over repeats, after one untimed call that compiles."""
  jax.block_until_ready(fn(jax.random.key(0)))
  times = []
  for r in range(flags.FLAGS.repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(jax.random.key(r + 1)))
    times.append(time.perf_counter() - start)
  return num_new / statistics.median(times)


def generation(layers: int) -> None:
  model, params = wavenet(layers)
  field = model.receptive_field
  fast_new, naive_new = 2048, 32
  # Fast: a one-sample prompt, then fast_new samples, each from the queues.
  prompt = jnp.full((1, 1), 128, jnp.int32)
  fast = samples_per_second(
    lambda k: decode.sample_loop(model, params, prompt, k, num_new=fast_new, cached=True),
    fast_new,
  )
  shared = samples_per_second(
    lambda k: decode.generate(model, params, prompt, fast_new, k).tokens, fast_new
  )
  # Naive: each new sample recomputes the forward over the field_size samples it can see.
  long_prompt = jnp.full((1, field - naive_new), 128, jnp.int32)
  naive = samples_per_second(
    lambda k: decode.sample_loop(model, params, long_prompt, k, num_new=naive_new, cached=False),
    naive_new,
  )
  print(
    f'  receptive field {field:5,d}: Fast WaveNet {fast:8,.0f} samples/s '
    f'(decode.generate {shared:7,.0f}), naive {naive:6,.1f} samples/s, '
    f'ratio {fast / naive:6,.0f}x'
  )


def run_pixelcnn(arg: str, steps: int, **data_fields) -> tuple[dict, float]:
  c = pixelcnn.get_config(arg)
  c.num_train_steps = steps
  c.optim.warmup_steps = min(c.optim.warmup_steps, steps // 10)
  c.eval_every_steps = c.checkpoint_every_steps = steps
  c.log_every_steps = min(c.log_every_steps, steps)
  for key, value in data_fields.items():
    c.data[key] = value
  start = time.perf_counter()
  final = train.train_and_evaluate(c, tempfile.mkdtemp(prefix='conv_bench_'))
  return final, time.perf_counter() - start


def bench():
  print('WaveNet generation, batch 1, 256 levels, kernel 2, 32 residual channels:')
  for layers in (10, 12):
    generation(layers)
  steps = flags.FLAGS.pixelcnn_steps
  final, seconds = run_pixelcnn('dataset=digits', steps)
  print(
    f'PixelCNN (gated) on the digits after {steps} steps ({seconds:.0f} s with compiles, eval '
    f'and the sample): {final["eval/bits_per_dim"]:.3f} bits/dim on validation '
    '(uniform: 8; uniform over the 17 levels used: 4.09)'
  )
  if not (TFDS_DIR / 'binarized_mnist').is_dir():
    print(f'binarized MNIST: skipped, no prepared TFDS copy under {TFDS_DIR}')
    return
  steps = flags.FLAGS.bmnist_steps
  final, seconds = run_pixelcnn('dataset=binarized_mnist', steps, data_dir=str(TFDS_DIR))
  print(
    f'binarized MNIST after {steps} steps ({seconds:.0f} s): '
    f'{final["eval/nats_per_image"]:.2f} nats/image (PixelCNN reference: 81.30)'
  )


def main(argv):
  del argv
  cli.run(bench)


if __name__ == '__main__':
  app.run(main)
