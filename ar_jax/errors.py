"""Failures explained in plain words: the entry points print them alone, without a traceback."""


class Error(Exception):
  """Base of the errors the command line reports as one line and a non-zero exit."""


class ConfigError(Error, ValueError):
  """Bad input: a config value, a flag, a data file, a prompt."""


class RunError(Error):
  """The run cannot go on: a non-finite loss, unreadable checkpoints, a failed save."""


def check(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless condition holds."""
  if not condition:
    raise ConfigError(message)
