"""A jax.profiler trace of chosen training steps: config.profile.steps = (start, count) writes
steps start .. start + count - 1 into WORKDIR/profile, for TensorBoard's profile plugin
(`tensorboard --logdir WORKDIR/profile`) or Perfetto (ui.perfetto.dev opens its
.trace.json.gz)."""

import logging
import os

import jax

from ar_jax.errors import check

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO


def validate(profile) -> None:
  steps = tuple(profile.steps)
  check(
    len(steps) == 2 and all(isinstance(n, int) and n >= 0 for n in steps),
    f'profile.steps=(start, count) must be two non-negative integers, got {steps}',
  )


class Trace:
  def __init__(self, config, workdir: str):
    start, count = config.profile.steps
    self.start, self.stop = start, start + count
    self.dir, self.active = os.path.join(workdir, 'profile'), False

  def marks(self) -> tuple[int, ...]:
    """The steps a dispatch must begin or end at, so the trace holds exactly its steps."""
    return (self.start, self.stop) if self.stop > self.start else ()

  def before(self, step: int) -> None:
    if step == self.start < self.stop and jax.process_index() == 0:
      jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
      self.active = True

  def after(self, step: int, state) -> None:
    if self.active and step >= self.stop:
      self.finish(state)

  def finish(self, state=None) -> None:
    """Stops the trace once `state`, the traced steps' result, is computed; without a state
    (a run ending early, or on an error), at once."""
    if self.active:
      if state is not None:
        jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      log.info('profile of steps %d to %d in %s', self.start, self.stop - 1, self.dir)
