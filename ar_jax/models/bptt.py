"""A recurrent layer's loop over time, with backpropagation through time written by hand.

The Elman recurrence (Elman 1990) h_t = f(W_x x_t + W_h h_{t-1} + b_h) with output logits
W_y h_t + b_y, generalised to gated cells (cells.py: each step's gates and their backward).
Every step is one matmul, h_{t-1} @ W_h, followed by elementwise gates; the input projection
x @ W_x of all steps is one matmul before the loop. Backpropagation through time (Werbos
1990) is the recursion r_t = f'(a_t) * (W_y^T e_t + W_h^T r_{t+1}) on the pre-activation
error (e_t the error on step t's logits): the forward loop saves each step's activated gates,
the backward loop carries the error on the state and does one matmul per step, and the
kernels' gradients (dW_h = sum_t h_{t-1}^T dz_t) are one large matmul each after it, instead
of an accumulation inside the loop.

Arrays are time-major ([T, B, ...]): the scans index time on the leading axis. Kernels are
stored [in, out] (x @ W), so the W_x above is the transpose of a layer's input_kernel.

Dimension legend: B batch, T time, D the layer's input width, S state width, G gates * S,
R the width of a step's saved gates.
"""

import functools

import jax
import jax.numpy as jnp

from ar_jax.models import cells

_NN = ((1,), (0,))  # a @ b
_NT = ((1,), (1,))  # a @ b.T, without materialising the transpose
_TIME_BATCH = ((0, 1), (0, 1))  # summed over time and batch: the kernels' gradients


def matmul(a, b, dtype, contracting):
  """A matmul with operands in the compute dtype, accumulated and returned in the wider of
  float32 and it (float64 where the parameters are, under jax_enable_x64).

  The state and gates are float32, so a float32 result costs nothing; and XLA:CPU runs
  bf16 x bf16 -> float32 on the AMX units, while a bf16 result takes a path slower than
  float32's (bench/rnn_cpu.py; docs/benchmarks.md).
  """
  return jax.lax.dot_general(
    a.astype(dtype),
    b.astype(dtype),
    (contracting, ((), ())),
    preferred_element_type=jnp.promote_types(jnp.float32, dtype),
  )


def state_dtype(param_dtype) -> jnp.dtype:
  """The state's and gates' dtype: float32, or the parameters' when wider (float64)."""
  return jnp.promote_types(jnp.float32, param_dtype)


def _mask(carry, keep_B):
  return tuple(a * keep_B[:, None] for a in carry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def recurrence(cell: cells.Cell, unroll: int, dtype, x_TBD, w_DG, b_G, w_SG, b_h, carry0, keep_TB):
  """Runs the cell over T steps: (outputs h_TBS, final carry).

  w_DG, b_G project the inputs, w_SG, b_h (None but for the GRU) the state; the matmuls
  compute in `dtype`. keep_TB zeroes the carry before step t where it is 0 (a document
  starts at t).
  """
  return _forward(cell, unroll, dtype, x_TBD, w_DG, b_G, w_SG, b_h, carry0, keep_TB)[0]


def _forward(cell, unroll, dtype, x_TBD, w_DG, b_G, w_SG, b_h, carry0, keep_TB, training=False):
  # The input projection of every time step, hoisted out of the loop: one large matmul. Its
  # bias is added in the loop, where it fuses into the gates instead of costing a pass.
  xz_TBG = matmul(x_TBD, w_DG, dtype, ((2,), (0,)))
  # XLA:CPU runs the per-step [B, S] x [S, G] matmul faster against the kernel transposed in
  # memory. Training pays for the transpose once per T steps; decoding calls this once per
  # token, and XLA does not hoist the transpose out of its loop.
  w_h, dims = (w_SG.T, _NT) if training else (w_SG, _NN)
  w_h = w_h.astype(dtype)  # cast once, outside the loop

  def step(carry, inputs):
    xz_BG, keep_B = inputs
    carry = _mask(carry, keep_B)
    hz_BG = matmul(carry[0], w_h, dtype, dims) + (0.0 if b_h is None else b_h)
    new, saved = cell.forward(xz_BG + b_G, hz_BG, carry)
    return new, (new[0], carry, saved)

  final, (h_TBS, prev_TB, saved_TBR) = jax.lax.scan(step, carry0, (xz_TBG, keep_TB), unroll=unroll)
  return (h_TBS, final), (prev_TB, saved_TBR)


def _recurrence_fwd(cell, unroll, dtype, x_TBD, w_DG, b_G, w_SG, b_h, carry0, keep_TB):
  out, (prev_TB, saved_TBR) = _forward(
    cell, unroll, dtype, x_TBD, w_DG, b_G, w_SG, b_h, carry0, keep_TB, training=True
  )
  return out, (x_TBD, w_DG, w_SG, b_h, keep_TB, prev_TB, saved_TBR)


def _recurrence_bwd(cell, unroll, dtype, residuals, cotangents):
  """Backpropagation through time: the error on the state at t is the local error from the
  output plus the error carried back from t + 1 through the cell; r_t = dz_t drives every gradient.

  The loop carries the error on the state and does one matmul per step; the gradients of
  the inputs and of the kernels are one large matmul each after it, and stay float32.
  """
  x_TBD, w_DG, w_SG, b_h, keep_TB, prev_TB, saved_TBR = residuals
  dh_TBS, dfinal = cotangents
  w_SG_c = w_SG.astype(dtype)  # cast once, outside the loop

  def step(dcarry, inputs):
    saved_BR, prev, dh_BS, keep_B = inputs
    dcarry = (dcarry[0] + dh_BS, *dcarry[1:])  # h_t is both the output and the next state
    dxz_BG, dhz_BG, dprev = cell.backward(saved_BR, prev, dcarry)
    dh_prev = dprev[0] + matmul(dhz_BG, w_SG_c, dtype, _NT)
    # Where z = xz + hz the two errors are one array: stack it once.
    return _mask((dh_prev, *dprev[1:]), keep_B), (dxz_BG, None if dhz_BG is dxz_BG else dhz_BG)

  dcarry0, (dxz_TBG, dhz_TBG) = jax.lax.scan(
    step, dfinal, (saved_TBR, prev_TB, dh_TBS, keep_TB), reverse=True, unroll=unroll
  )
  dhz_TBG = dxz_TBG if dhz_TBG is None else dhz_TBG
  return (
    matmul(dxz_TBG, w_DG, dtype, ((2,), (1,))).astype(x_TBD.dtype),
    matmul(x_TBD, dxz_TBG, dtype, _TIME_BATCH),
    dxz_TBG.sum(axis=(0, 1)),
    matmul(prev_TB[0], dhz_TBG, dtype, _TIME_BATCH),
    None if b_h is None else dhz_TBG.sum(axis=(0, 1)),
    dcarry0,
    jnp.zeros_like(keep_TB),
  )


recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)
