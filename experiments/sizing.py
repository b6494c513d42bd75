"""Model widths solved for a target size: how studies match models across families."""

from ar_jax import models


def match_width(model, target: float, which: int, vocab_size: int, seq_len: int) -> None:
  """Sets config.model's width so that models.size(...)[which] (0: parameters, 1: forward
  FLOPs per token) is nearest target. Both grow with the width, so a bisection finds it."""

  sizes: dict[int, float] = {}

  def measure(width: int) -> float:
    if width not in sizes:
      set_width(model, width)
      sizes[width] = models.size(model, vocab_size, seq_len)[which]
    return sizes[width]

  low, high = 1, 4096
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if measure(mid) < target else (low, mid)
  set_width(model, min((low, high), key=lambda w: abs(measure(w) - target)))


def set_width(model, width: int) -> None:
  """The width of a recurrent model (its state; the residual stream of a recurrence linear in
  the state) or a convolutional one (its channels)."""
  if model.name == 'rnn':
    model.d_hidden = width
  elif model.name in ('minrnn', 'hawk', 'mamba'):  # their state and MLP widths follow d_model
    model.d_model = width
  elif model.name == 'conv':  # the residual stack, its skips (WaveNet) and the head
    model.channels = model.head_channels = width
    model.skip_channels = width if model.skip_channels else 0
  else:
    raise ValueError(f'no width to solve for model.name={model.name!r}')
