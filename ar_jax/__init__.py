"""ar_jax: autoregressive sequence models in JAX/Flax."""

import os


def _xla_defaults() -> None:
  """XLA options ar_jax runs best with, added to XLA_FLAGS unless that names them already.
  XLA reads them when JAX starts its backend, so they hold in any process that imports
  ar_jax before its first computation.

  --xla_gpu_enable_triton_gemm=false (GPUs only; CPUs and TPUs ignore it): every matmul goes
  to cuBLAS. Otherwise XLA fuses a matmul's elementwise producers (the tied embedding's bf16
  cast, say) into a Triton GEMM, and on an H200 GPT-2's three vocabulary-sized matmuls took
  24 ms of a 78 ms step that way, against 69 ms per step through cuBLAS. NVIDIA's JAX
  containers have set the same.
  """
  flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_gpu_enable_triton_gemm' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --xla_gpu_enable_triton_gemm=false'.strip()


_xla_defaults()
