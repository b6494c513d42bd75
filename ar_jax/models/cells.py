"""The recurrent cells of ar_jax/models/rnn.py: each step's gates and their hand-written
backward, for the BPTT loop there.

Dimension legend: B batch, S state width, G gates * S, R the width of a step's saved gates.
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Cell(NamedTuple):
  """A recurrent cell: G projection blocks of width S, its step and the step's backward.

  forward(xz_BG, hz_BG, carry) -> (new carry, saved_BR): xz is the input projection (with
  its bias), hz = h_{t-1} @ W_h (+ recurrent bias), carry a tuple whose first entry is h,
  and saved_BR what the backward needs of the step: the activated gates, so the backward
  loop evaluates no nonlinearity.
  backward(saved_BR, carry, dcarry) -> (dxz_BG, dhz_BG, dcarry_prev): given the step's
  input carry and dcarry, the error on its new carry, the errors on the pre-activations
  (r_t = f'(a_t) * s_t, s_t the error on the state) and on the input carry, leaving out the
  path through W_h, which the BPTT loop adds.
  """

  gates: int
  forward: Callable
  backward: Callable
  state_names: tuple[str, ...]
  recurrent_bias: bool = False


def _elman(activation):
  f, df = {  # df in terms of the output h = f(a)
    'tanh': (jnp.tanh, lambda h: 1.0 - h * h),
    'relu': (jax.nn.relu, lambda h: (h > 0).astype(h.dtype)),
  }[activation]

  def forward(xz, hz, carry):
    h = f(xz + hz)
    return (h,), h

  def backward(h, carry, dcarry):
    da = dcarry[0] * df(h)
    return da, da, (0.0,)

  return Cell(1, forward, backward, ('h',))


def _lstm_forward(xz, hz, carry):
  """LSTM gates (Hochreiter & Schmidhuber 1997; Gers et al. 2000): i, f, o = sigmoid(.),
  candidate = tanh(.), c = f c + i candidate, h = o tanh(c); '.' = W [h_{t-1}, x_t] + b,
  split here into hz + xz."""
  a_i, a_f, a_g, a_o = jnp.split(xz + hz, 4, axis=-1)
  i, f, g, o = jax.nn.sigmoid(a_i), jax.nn.sigmoid(a_f), jnp.tanh(a_g), jax.nn.sigmoid(a_o)
  c = f * carry[1] + i * g
  tanh_c = jnp.tanh(c)
  return (o * tanh_c, c), jnp.concatenate([i, f, g, o, tanh_c], axis=-1)


def _lstm_backward(saved, carry, dcarry):
  i, f, g, o, tanh_c = jnp.split(saved, 5, axis=-1)
  dh, dc = dcarry
  dc = dc + dh * o * (1.0 - tanh_c * tanh_c)  # c reaches the loss directly and through h
  da = jnp.concatenate(
    [
      dc * g * i * (1.0 - i),
      dc * carry[1] * f * (1.0 - f),
      dc * i * (1.0 - g * g),
      dh * tanh_c * o * (1.0 - o),
    ],
    axis=-1,
  )
  return da, da, (0.0, dc * f)


def _gru_forward(xz, hz, carry):
  """Cho et al. (2014) with the reset gate applied after the recurrent matmul:
  n = tanh(xz_n + r * (U_n h + b_n)) rather than tanh(xz_n + U_n (r * h)).

  This is the cuDNN / PyTorch / Keras-default form. It keeps every cell at one recurrent
  matmul per step, h @ [U_r U_z U_n], which the hand-written BPTT below relies on; the
  paper's form needs a second matmul after r is known, on the sequential critical path.
  """
  xr, xz_, xn = jnp.split(xz, 3, axis=-1)
  hr, hz_, hn = jnp.split(hz, 3, axis=-1)
  r = jax.nn.sigmoid(xr + hr)
  z = jax.nn.sigmoid(xz_ + hz_)
  n = jnp.tanh(xn + r * hn)
  return ((1.0 - z) * n + z * carry[0],), jnp.concatenate([r, z, n, hn], axis=-1)


def _gru_backward(saved, carry, dcarry):
  r, z, n, hn = jnp.split(saved, 4, axis=-1)
  (dh,) = dcarry
  da_n = dh * (1.0 - z) * (1.0 - n * n)
  da_r = da_n * hn * r * (1.0 - r)
  da_z = dh * (carry[0] - n) * z * (1.0 - z)
  # The input side sees n's pre-activation error; the recurrent side sees it through r.
  return (
    jnp.concatenate([da_r, da_z, da_n], axis=-1),
    jnp.concatenate([da_r, da_z, da_n * r], axis=-1),
    (dh * z,),
  )


def make_cell(name: str, activation: str = 'tanh') -> Cell:
  """The cell named 'elman' (with its activation), 'lstm' or 'gru'."""
  if name == 'elman':
    return _elman(activation)
  if name == 'lstm':
    return Cell(4, _lstm_forward, _lstm_backward, ('h', 'c'))
  return Cell(3, _gru_forward, _gru_backward, ('h',), recurrent_bias=True)
