"""The numbers of a family's forward pass, and the two paths that platforms take through them,
fenced here behind one config field (model.numerics, whose default each platform chooses in
ar_jax/platform.py).

Every family keeps its matmul operands in the compute dtype (model.dtype), accumulates in
float32 (or wider), and keeps its parameters float32. What differs is everything between the
matmuls:

  'accelerator'  activations in the compute dtype: half-precision activations halve the
                 memory traffic the elementwise work is bound by on a GPU or TPU, and keep
                 the backward pass's matmuls in half precision; transposes are XLA's.
  'cpu'          activations in float32 whatever the compute dtype: a CPU's vector units run
                 bf16 elementwise no faster than float32, and every conversion is one more
                 pass; half-precision matmuls keep their gradient's products in half
                 precision (XLA:CPU runs bf16 x bf16 -> float32 on its matrix units), and
                 their transposed operands are materialised row-major (XLA:CPU's bf16
                 kernels, YNNPACK's, take no other layout).

In float32 the two compute the same numbers. The test suite runs both on a CPU, so the
accelerators' numerics are tested here; docs/benchmarks.md has what each path measured.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ar_jax import platform
from ar_jax.errors import check

COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
PATHS = ('auto', 'cpu', 'accelerator')


@dataclasses.dataclass(frozen=True)
class Policy:
  """What a family computes in: its matmul operands and its activations, on which path."""

  compute: jnp.dtype  # matmul operands
  activations: jnp.dtype  # between matmuls
  cpu: bool  # the CPU path (see the module docstring)

  @property
  def accumulation(self) -> jnp.dtype:
    """Products of compute-dtype operands are summed in float32 at least (float64 under x64)."""
    return accumulation(self.compute)


def accumulation(dtype) -> jnp.dtype:
  return jnp.promote_types(jnp.float32, dtype)


def policy(dtype: str, path: str = 'auto') -> Policy:
  """The policy of compute dtype `dtype` on `path` ('auto': this process's platform's)."""
  cpu = (platform.numerics() if path == 'auto' else path) == 'cpu'
  compute = jnp.dtype(dtype)
  return Policy(compute, accumulation(compute) if cpu else compute, cpu)


FLOAT32 = Policy(jnp.dtype(jnp.float32), jnp.dtype(jnp.float32), False)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NumericsConfig:
  """The numerics fields of a family's Config (which inherits them)."""

  dtype: str = 'float32'  # compute dtype of the matmuls ('bfloat16' on accelerators)
  # The path between the matmuls: 'cpu', 'accelerator', or 'auto' (this process's platform's;
  # see ar_jax/models/numerics.py).
  numerics: str = 'auto'

  def check_numerics(self) -> None:
    check(
      self.dtype in COMPUTE_DTYPES,
      f'model.dtype={self.dtype!r}; allowed: {", ".join(COMPUTE_DTYPES)}',
    )
    check(self.numerics in PATHS, f'model.numerics={self.numerics!r}; allowed: {", ".join(PATHS)}')

  @property
  def policy(self) -> Policy:
    return policy(self.dtype, self.numerics)


def matmul(a, b, p: Policy, transpose_b: bool = False, out_dtype=None):
  """a @ b, or a @ b^T with transpose_b (b's last two axes swapped), batched over any leading
  axes both share: operands in p.compute, accumulated in float32 (or wider), returned in
  out_dtype (default p.activations)."""
  dtype = p.compute
  out_dtype = jnp.dtype(out_dtype or p.activations)
  if out_dtype == dtype:  # a half-precision result keeps the gradient's products in it
    return _dot(a.astype(dtype), b.astype(dtype), transpose_b, dtype)
  check(out_dtype == accumulation(dtype), f'a matmul of {dtype} operands to {out_dtype}')
  return _half_matmul(dtype, transpose_b, p.cpu, a, b)


def _dot(a, b, transpose_b: bool, out_dtype=None):
  """The product as one dot_general with its contracting axes named, accumulated in float32
  (or wider) and returned in out_dtype (default that). Written as a transpose and a matmul,
  XLA:CPU lays the transpose out as a column-major view, which its bf16 matmul kernels do not
  take."""
  batch = tuple(range(a.ndim - 2))
  contract = ((a.ndim - 1,), (b.ndim - (1 if transpose_b else 2),))
  out_dtype = out_dtype or accumulation(a.dtype)
  return jax.lax.dot_general(a, b, (contract, (batch, batch)), preferred_element_type=out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _half_matmul(dtype, transpose_b, cpu, a, b):
  """matmul where the result is wider than the operands (float32 activations of bf16
  operands). The gradient's two products take the cotangent in `dtype` too: autodiff would
  pair the float32 cotangent with a widened operand, a float32 product off the bf16 units (a
  GPU's tensor cores, a CPU's AMX)."""
  return _half_matmul_fwd(dtype, transpose_b, cpu, a, b)[0]


def _half_matmul_fwd(dtype, transpose_b, cpu, a, b):
  del cpu
  a_half, b_half = a.astype(dtype), b.astype(dtype)
  # Zero-size stand-ins carry the operands' own dtypes (float32 parameters get float32
  # gradients) to the backward pass.
  dtypes = (jnp.zeros(0, a.dtype), jnp.zeros(0, b.dtype))
  return _dot(a_half, b_half, transpose_b), (a_half, b_half, *dtypes)


def _half_matmul_bwd(dtype, transpose_b, cpu, residuals, g):
  a, b, a_like, b_like = residuals
  g = g.astype(dtype)
  if transpose_b:  # out = a b^T: da = g b, db = g^T a
    da, db = _dot(g, b, False), _dot(_swap(g, -1, -2, cpu), a, False)
  else:  # out = a b: da = g b^T, db = a^T g
    da, db = _dot(g, b, True), _dot(_swap(a, -1, -2, cpu, witness=g), g, False)
  return da.astype(a_like.dtype), db.astype(b_like.dtype)


_half_matmul.defvjp(_half_matmul_fwd, _half_matmul_bwd)


def swapped(x, axis1: int, axis2: int, p: Policy):
  """jnp.swapaxes(x, axis1, axis2); on the CPU path, materialised in row-major order."""
  return _swap(x, axis1, axis2, p.cpu)


def _swap(x, axis1: int, axis2: int, cpu: bool, witness=None):
  """jnp.swapaxes; with cpu, materialised row-major: XLA:CPU lays a plain transpose out as a
  column-major view where it can, and a bf16 product of it then runs upcast to float32, at a
  quarter of the speed (a weight's gradient x^T g, attention's products over heads).
  Computed inside a conditional, the transpose is materialised. The predicate has to be one
  XLA cannot decide while compiling: the first element of `witness` (default x) is not NaN;
  when it is, the result is NaN in every element rather than in some."""
  if not cpu:
    return jnp.swapaxes(x, axis1, axis2)
  first = (x if witness is None else witness).reshape(-1)[0]
  nan = jnp.full(jnp.swapaxes(x, axis1, axis2).shape, jnp.nan, x.dtype)
  swap = lambda x: jnp.swapaxes(x, axis1, axis2)
  return jax.lax.cond(first == first, swap, lambda x: nan, x)
