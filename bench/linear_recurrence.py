"""The parallel scans against the same recurrences run one step at a time, forward and
backward: h_t = a_t h_{t-1} + b_t over [8, T, 512] by recurrence.affine_scan against
jax.lax.scan one step at a time, and Mamba's chunked selective scan (E 512, N 16, chunks of
256) against a lax.scan of the same recurrence, at T = 128 and 1,024, as tokens (batch x T)
per second. Each model's own training and decoding speed is bench/families.py's.

  python bench/linear_recurrence.py [--repeats=5] [--tiny]

Medians of --repeats timings; absolute figures move with the machine's load, the ratios
within one run much less.
"""

import pathlib
import sys

from absl import app, flags

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import timing  # noqa: E402

timing.define_flags('Small scans', corpus=False)
FLAGS = flags.FLAGS


def sequential_selective(u, delta, a_EN, b_BTN, c_BTN, keep, h0, chunk):
  """mamba.selective_scan's recurrence, one position at a time."""
  import jax
  import jax.numpy as jnp

  from ar_jax.models.families import mamba

  del keep, chunk

  def step(h, x):
    u_BE, delta_BE, b_BN, c_BN = x
    abar, bbar = mamba.discretise(delta_BE[:, None], a_EN, b_BN[:, None])
    h = abar[:, 0] * h + bbar[:, 0] * u_BE[..., None]
    return h, jnp.einsum('ben,bn->be', h, c_BN)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u, delta, b_BTN, c_BTN))
  h, y_TBE = jax.lax.scan(step, h0, xs)
  return jnp.moveaxis(y_TBE, 0, 1), h


def scans_table(tiny: bool, repeats: int) -> None:
  import jax
  import jax.numpy as jnp

  from ar_jax.models import recurrence
  from ar_jax.models.families import mamba

  B, E, N = (2, 16, 4) if tiny else (8, 512, 16)
  print('| scan | T | parallel tokens/s | sequential tokens/s | parallel / sequential |')
  print('| --- | --- | --- | --- | --- |')
  for T in (128, 1024):
    keys = jax.random.split(jax.random.key(T), 6)
    a = jax.random.uniform(keys[0], (B, T, E), minval=0.5, maxval=1.0)
    b = jax.random.normal(keys[1], (B, T, E))
    h0 = jnp.zeros((B, E))
    u = jax.random.normal(keys[2], (B, T, E))
    delta = jnp.exp(jax.random.normal(keys[3], (B, T, E)) - 3)
    a_EN = -jnp.broadcast_to(jnp.arange(1.0, N + 1), (E, N))
    b_BTN, c_BTN = jax.random.normal(keys[4], (2, B, T, N))
    keep = jnp.ones((B, T), bool)
    h0_EN = jnp.zeros((B, E, N))
    cases = {
      'affine [B, T, E]': (recurrence.affine_scan, recurrence.sequential_scan, (a, b, h0)),
      'selective [B, T, E, N]': (
        lambda *x: mamba.selective_scan(*x, 256)[0],
        lambda *x: sequential_selective(*x, 256)[0],
        (u, delta, a_EN, b_BTN, c_BTN, keep, h0_EN),
      ),
    }
    for name, (parallel, one_by_one, args) in cases.items():
      rates = []
      for scan in (parallel, one_by_one):
        # Gradients with respect to the float inputs (the keep mask is not one).
        argnums = tuple(i for i, x in enumerate(args) if x.dtype != bool)
        grad = jax.jit(jax.grad(lambda *x, f=scan: f(*x).sum(), argnums=argnums))
        rates.append(B * T / timing.median_seconds(lambda g=grad, x=args: g(*x), repeats))
      print(f'| {name} | {T:,} | {rates[0]:,.0f} | {rates[1]:,.0f} | {rates[0] / rates[1]:.2f}x |')


def main(argv):
  del argv
  import jax

  print(f'# {timing.cpu_model()}; {jax.devices()[0].device_kind}; repeats {FLAGS.repeats}\n')
  scans_table(FLAGS.tiny, FLAGS.repeats)


if __name__ == '__main__':
  app.run(main)
