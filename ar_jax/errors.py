"""The one exception type that means "the user asked for something we cannot do"."""


class ConfigError(ValueError):
  """Bad input named in plain words: the entry points print it alone, without a traceback."""


def check(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless condition holds."""
  if not condition:
    raise ConfigError(message)
