"""What the command-line entry points share: quiet library logs, and bad input as one line."""

import logging as py_logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable

from absl import flags, logging

from ar_jax import platform
from ar_jax.errors import Error


class _OwnInfoOnly(py_logging.Filter):
  """Keeps INFO lines from ar_jax's own loggers (ar_jax.*); libraries (orbax, jax) show
  warnings and errors, and their INFO too when --verbosity asks for more than INFO.

  Decided by the logger's name, not the file's path: a virtual environment inside a folder
  named ar_jax puts every library under such a path. A failed checkpoint read or write is
  raised to ar_jax and reported there in one line, so orbax's own error lines lose their
  tracebacks, and asyncio's reports of orbax's abandoned tasks are dropped.
  """

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.WARNING:
      return record.name.partition('.')[0] == 'ar_jax' or flags.FLAGS['verbosity'].value > 0
    if record.name == 'asyncio' and 'orbax' in record.getMessage():
      return False
    if record.name.partition('.')[0] == 'orbax' or '/orbax/' in record.pathname:
      record.exc_info, record.exc_text = None, None
    return True


def run(fn: Callable[[], None]) -> None:
  """Runs an entry point's body, with the platform's XLA defaults set before JAX starts; an
  ar_jax Error exits non-zero with its message alone."""
  platform.set_xla_defaults()
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  _compilation_cache()
  try:
    fn()
  except Error as e:
    print(f'error: {e}', file=sys.stderr)
    _exit(1)


def _compilation_cache() -> None:
  """JAX's persistent compilation cache, in AR_JAX_CACHE_DIR/jax (~/.cache/ar_jax/jax) unless
  JAX_COMPILATION_CACHE_DIR names another: a program compiles once per machine, and every
  later process that runs it (a resumed run, the same experiment again, a sweep's points of
  one shape, sampling a workdir) loads it instead, on any platform: compiles are seconds of a
  short CPU run's wall, and often minutes on an accelerator. Programs that compile in under
  0.5 s are not kept."""
  import jax

  from ar_jax.monitor import flops

  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update('jax_compilation_cache_dir', os.path.join(flops.CACHE_DIR, 'jax'))
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def _exit(code: int, grace_seconds: float = 10.0) -> None:
  """Exits, not waiting forever for library threads that cannot finish: after a failed
  asynchronous save, orbax leaves threads waiting (for up to its 10-minute timeout) on
  signals that the failed operation will never send, and the interpreter would wait for them
  before exiting. Everything of ar_jax's own is closed by now."""
  others = lambda: [
    t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon
  ]
  deadline = time.monotonic() + grace_seconds
  while others() and time.monotonic() < deadline:
    time.sleep(0.05)  # polled: orbax's threads override join() to raise on a timeout
  if others():
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag, --config file or --config override reported in one
  line.

  Config files are loaded and overrides applied while parsing: an unknown key (the config
  is locked), a value of the wrong type, a bad config arg or an error in the file itself
  surfaces here.
  """
  try:
    rest = flags.FLAGS(argv)
    if 'config' in flags.FLAGS and not isinstance(flags.FLAGS.config, str | None):
      flags.FLAGS.config.keys()  # a missing file is reported lazily, on first use: use it now
    return rest
  except Exception as e:  # the experiment file is user code: any error is one line
    sys.exit(f'error: {_message(e, _config_path(argv))}')


def _config_path(argv: list[str]) -> str | None:
  path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), None)
  return path and os.path.abspath(path.partition(':')[0])


def _message(e: BaseException, config_path: str | None) -> str:
  if isinstance(e, SyntaxError):
    return f'{e.filename}, line {e.lineno}: SyntaxError: {e.msg}'
  where = [
    f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == config_path
  ]
  if where:  # raised while the experiment file ran: say where in it
    return f'{where[-1].filename}, line {where[-1].lineno}: {type(e).__name__}: {e}'
  text = str(e)
  if 'Traceback (most recent call last)' in text:
    # config_flags folds an exception raised by get_config into its message as a traceback,
    # whose last line is "module.ExceptionType: message".
    kind, _, message = text.strip().splitlines()[-1].partition(': ')
    if kind.startswith('ar_jax.errors.'):  # ours: the message stands alone
      return message
    lines = re.findall(r'File "([^"]+)", line (\d+)', text)
    where = [f'{f}, line {n}: ' for f, n in lines if os.path.abspath(f) == config_path]
    return f'{where[-1] if where else ""}{kind.rpartition(".")[2]}: {message}'
  if isinstance(e.__context__, KeyError) or isinstance(e, KeyError):
    key = (e.__context__ or e).args[0]  # the locked config refuses a key it does not have
    return f'a --config override names a field the config does not have: {key}'
  if isinstance(e, OSError) and text:  # config_flags: "... Attempted ... [Errno 2] ..."
    return f'--config: {text.strip().splitlines()[-1].strip()}'
  return text
