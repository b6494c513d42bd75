"""Model widths solved for a target size: how studies match models across families."""

import math

import numpy as np

from ar_jax import models

_PROBES = (32, 128, 512)  # widths a quadratic fit of the size is read from
MAX_WIDTH = 4096  # the widest a width is solved to


def match_width(model, target: float, which: int, vocab_size: int, seq_len: int) -> None:
  """Sets config.model's width so that models.size(...)[which] (0: parameters, 1: forward
  FLOPs per token) is nearest target.

  Both grow with the width w as a quadratic, a w^2 + b w + c (square matrices, then the
  embedding, head and biases), up to the rounding of widths derived from w (Mamba's dt rank,
  say). Each models.size traces the model, so instead of bisecting (12 traces) the width is
  read off the quadratic through three probes and a bisection finishes it next to that
  guess: six traces in all."""

  sizes: dict[int, float] = {}

  def measure(width: int) -> float:
    if width not in sizes:
      set_width(model, width)
      sizes[width] = models.size(model, vocab_size, seq_len)[which]
    return sizes[width]

  a, b, c = np.polyfit(_PROBES, [measure(w) for w in _PROBES], 2)
  guess = round((-b + math.sqrt(max(b * b - 4 * a * (c - target), 0.0))) / (2 * a))
  # The guess is the answer or next to it (for every model here), so bisect [guess - 1,
  # guess + 1]; should the guess be further off, the bisection runs on to the bound.
  low, high = min(max(guess - 1, 1), MAX_WIDTH - 1), min(max(guess + 1, 2), MAX_WIDTH)
  if measure(low) >= target:
    low = 1
  if measure(high) < target:
    high = MAX_WIDTH
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if measure(mid) < target else (low, mid)
  set_width(model, min((low, high), key=lambda w: abs(measure(w) - target)))


def set_width(model, width: int) -> None:
  """The family's width fields (contract.Capabilities.width) set to `width`, those set to 0
  (off, or derived) left at 0."""
  for field in models.capabilities(model.name).width:
    if model[field]:
      model[field] = width
