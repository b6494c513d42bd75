"""What the command-line entry points share: quiet library logs, and bad input as one line."""

import logging as py_logging
import sys
from collections.abc import Callable

from absl import flags, logging

from ar_jax.errors import ConfigError, Error


class _OwnInfoOnly(py_logging.Filter):
  """Keeps INFO lines from ar_jax; libraries (orbax, jax) still show warnings and errors."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or '/ar_jax/' in record.pathname


def run(fn: Callable[[], None]) -> None:
  """Runs an entry point's body; an ar_jax Error exits non-zero with its message alone."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  try:
    fn()
  except Error as e:
    sys.exit(f'error: {e}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag or --config override reported in one line.

  Config files are loaded and overrides applied while parsing: an unknown key (the config
  is locked), a value of the wrong type or a bad config arg surfaces here.
  """
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ConfigError, KeyError, ValueError, TypeError, AttributeError) as e:
    sys.exit(f'error: {_message(e)}')


def _message(e: BaseException) -> str:
  text = str(e)
  if 'Traceback (most recent call last)' in text:
    # config_flags folds the config file's exception into its message as a traceback; its
    # last line is "module.ExceptionType: message".
    return text.strip().splitlines()[-1].split(': ', 1)[-1]
  if isinstance(e.__context__, KeyError) or isinstance(e, KeyError):
    key = (e.__context__ or e).args[0]  # the locked config refuses a key it does not have
    return f'a --config override names a field the config does not have: {key}'
  return text
