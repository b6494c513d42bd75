"""What each platform runs best with, chosen in one place: the XLA flags the entry points set
before JAX starts, and the per-platform defaults of the model fields whose best value
depends on the hardware (model.numerics, model.attention). Nothing else in ar_jax asks which
backend it runs on.
"""

import os

import jax
import jax.numpy as jnp

# Flags added to XLA_FLAGS unless it names them already.
#
# --xla_gpu_enable_triton_gemm=false (GPUs only; CPUs and TPUs ignore it): every matmul goes
# to cuBLAS. Otherwise XLA fuses a matmul's elementwise producers (the tied embedding's bf16
# cast, say) into a Triton GEMM, which ran GPT-2's vocabulary-sized matmuls slower than
# cuBLAS does (docs/benchmarks.md); NVIDIA's JAX containers set the same.
XLA_DEFAULTS = ('--xla_gpu_enable_triton_gemm=false',)


def set_xla_defaults() -> None:
  """Adds XLA_DEFAULTS to XLA_FLAGS (each unless named there already). XLA reads them when
  JAX starts its backend, so the entry points call this before their first computation;
  importing ar_jax changes nothing."""
  flags = os.environ.get('XLA_FLAGS', '')
  for flag in XLA_DEFAULTS:
    if flag.partition('=')[0] not in flags:
      flags = f'{flags} {flag}'
  os.environ['XLA_FLAGS'] = flags.strip()


def numerics() -> str:
  """model.numerics='auto': the CPU path on a CPU, the accelerators' elsewhere
  (ar_jax/models/numerics.py)."""
  return 'cpu' if jax.default_backend() == 'cpu' else 'accelerator'


def attention(kind: str, cpu_path: bool, compute_dtype) -> str:
  """model.attention='auto': how attention is computed. On the CPU path the written-out form
  ('einsum': XLA:CPU trains the nanogpt_cpu GPT faster with it than with
  jax.nn.dot_product_attention's XLA form); on a GPU in half precision cuDNN's fused flash
  kernel; elsewhere jax.nn.dot_product_attention's XLA form."""
  if kind != 'auto':
    return kind
  if cpu_path:
    return 'einsum'
  half = jnp.dtype(compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return 'cudnn' if half and jax.default_backend() == 'gpu' else 'xla'
