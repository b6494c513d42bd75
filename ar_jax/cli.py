"""What the command-line entry points share: quiet library logs, and bad input as one line."""

import logging as py_logging
import sys
from collections.abc import Callable

from absl import logging

from ar_jax.errors import ConfigError


class _OwnInfoOnly(py_logging.Filter):
  """Keeps INFO lines from ar_jax; libraries (orbax, jax) still show warnings and errors."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or '/ar_jax/' in record.pathname


def run(fn: Callable[[], None]) -> None:
  """Runs an entry point's body; a ConfigError exits non-zero with its message alone."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  try:
    fn()
  except ConfigError as e:
    sys.exit(f'error: {e}')
