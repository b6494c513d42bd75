"""What the fault tests share: the real command line in a subprocess, bounded in time and
killed when its test ends, and readers of what a run leaves in its workdir."""

import contextlib
import json
import pathlib
import subprocess
import sys
import time

from tests import helpers
from tests.helpers import REPO, read_jsonl

TIMEOUT = 120  # seconds any one command may take


def command(corpus, workdir, *overrides):
  return [
    sys.executable,
    '-m',
    'ar_jax.main',
    f'--config=tests/faults/run_config.py:{corpus}',
    f'--workdir={workdir}',
    *overrides,
  ]


def sample_command(workdir, *flags):
  return [sys.executable, '-m', 'ar_jax.sample', f'--workdir={workdir}', *flags]


def env():
  return helpers.subprocess_env()  # one device, as users run


def run_command(args, check=True):
  out = helpers.run(args, cwd=REPO, env=env(), timeout=TIMEOUT)
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def run(corpus, workdir, *overrides, check=True):
  return run_command(command(corpus, workdir, *overrides), check)


@contextlib.contextmanager
def started(corpus, workdir, *overrides):
  """A training process running in the background; killed when the block ends, however."""
  proc = helpers.start(
    command(corpus, workdir, *overrides),
    cwd=REPO,
    env=env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.communicate()


def losses(workdir) -> dict[int, float]:
  return {
    m['step']: m['train/loss']
    for m in read_jsonl(pathlib.Path(workdir, 'metrics.jsonl'))
    if 'train/loss' in m
  }


def logged_step(workdir) -> int:
  path = pathlib.Path(workdir, 'metrics.jsonl')
  if not path.exists():
    return 0
  lines = [line for line in path.read_text().splitlines() if line.endswith('}')]
  return json.loads(lines[-1])['step'] if lines else 0


def wait_for(condition, proc, what):
  deadline = time.time() + TIMEOUT
  while not condition():
    assert proc.poll() is None, f'the run ended before {what}: {proc.stderr.read()[-2000:]}'
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.002)


def steps_on_disk(workdir) -> list[int]:
  return sorted(
    int(p.name) for p in pathlib.Path(workdir, 'checkpoints').iterdir() if p.name.isdigit()
  )


def snapshot(folder) -> list[tuple[str, int, int]]:
  """Every file under folder with its size and modification time: what must not change."""
  root = pathlib.Path(folder)
  return sorted(
    (str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
    for p in root.rglob('*')
    if p.is_file()
  )


def corrupt(step_dir: pathlib.Path) -> None:
  """Truncates every file of a checkpoint, as a crash of the filesystem or a copy would."""
  for path in step_dir.rglob('*'):
    if path.is_file():
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def one_line_error(out) -> None:
  """A refusal as the command line should give it: non-zero, one message, no traceback, and
  nothing from orbax's asynchronous machinery shutting down."""
  assert out.returncode != 0
  for noise in ('Traceback', 'Event loop is closed', 'cannot schedule new futures'):
    assert noise not in out.stderr, out.stderr[-3000:]
  assert out.stderr.count('error: ') == 1, out.stderr[-3000:]
