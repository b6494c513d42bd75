"""SIGTERM / SIGINT as a request to stop cleanly: the loop finishes its step and checkpoints.

Schedulers (SLURM, Kubernetes, TPU maintenance) send SIGTERM before killing a job; Ctrl-C
sends SIGINT. Every process must stop at the same step to write one consistent checkpoint,
so with several processes the request is agreed on collectively.
"""

import contextlib
import signal
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
  def __init__(self):
    self.signal: int | None = None

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def requested(self) -> bool:
    """Whether any process was asked to stop (a collective when there are several)."""
    asked = self.signal is not None
    if jax.process_count() > 1:
      asked = bool(np.any(multihost_utils.process_allgather(np.array(asked))))
    return asked


@contextlib.contextmanager
def stop_requests() -> Iterator[StopRequests]:
  """Installs the handlers for the duration of training, then restores the previous ones."""
  requests = StopRequests()
  if threading.current_thread() is not threading.main_thread():  # Python allows no handlers
    yield requests
    return
  previous = {s: signal.signal(s, requests._handle) for s in SIGNALS}
  try:
    yield requests
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
