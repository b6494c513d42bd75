"""Faults a cluster job meets: kill -9, preemption signals, damaged checkpoints, NaN, a full
disk, an unwritable workdir. Each case runs the real command line in a subprocess, bounded
in time, and checks that nothing is lost and the loss trajectory is the uninterrupted one."""

import errno
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

from ar_jax import train
from ar_jax.errors import ConfigError, RunError
from tests.helpers import REPO, read_jsonl, tiny_config

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


def env():
  return {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}  # one device, as users run


def run(corpus, workdir, *overrides, check=True):
  out = subprocess.run(
    command(corpus, workdir, *overrides),
    cwd=REPO,
    env=env(),
    capture_output=True,
    text=True,
    timeout=TIMEOUT,
  )
  if check:
    assert out.returncode == 0, out.stderr[-3000:]
  return out


def start(corpus, workdir, *overrides):
  return subprocess.Popen(
    command(corpus, workdir, *overrides),
    cwd=REPO,
    env=env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


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


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  words = [
    'to',
    'be',
    'or',
    'not',
    'to',
    'be',
    'that',
    'is',
    'the',
    'question',
    'whether',
    'tis',
    'nobler',
    'in',
    'the',
    'mind',
  ]
  path = tmp_path_factory.mktemp('corpus') / 'corpus.txt'
  path.write_text('\n'.join(' '.join(words[i % 5 :] + words[: i % 5]) for i in range(300)))
  return path


@pytest.fixture(scope='module')
def reference(corpus, tmp_path_factory):
  """The uninterrupted run's loss at every step."""
  workdir = tmp_path_factory.mktemp('reference')
  run(corpus, workdir)
  return losses(workdir)


def test_kill_9_at_a_random_step_then_resume_is_bit_for_bit(corpus, reference, tmp_path):
  target = random.Random(os.getpid()).randint(25, 100)
  proc = start(corpus, tmp_path)
  wait_for(lambda: logged_step(tmp_path) >= target, proc, f'step {target}')
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=TIMEOUT)
  killed_at = logged_step(tmp_path)
  assert killed_at < 120, 'the run finished before it could be killed'
  run(corpus, tmp_path)
  assert losses(tmp_path) == reference  # every step, once, bit for bit


def test_kill_9_while_a_checkpoint_is_written(corpus, reference, tmp_path):
  proc = start(corpus, tmp_path)
  checkpoints = tmp_path / 'checkpoints'
  writing = lambda: (
    checkpoints.exists()
    and any('tmp' in p.name for p in checkpoints.iterdir() if p.name.startswith('40'))
  )
  wait_for(writing, proc, 'the checkpoint at step 40 to be in flight')
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=TIMEOUT)
  assert 40 not in steps_on_disk(tmp_path)  # the half-written step is not a checkpoint
  out = run(corpus, tmp_path)
  assert 'resumed from the checkpoint at step 20' in out.stderr
  assert not [p for p in checkpoints.iterdir() if 'tmp' in p.name]  # debris cleaned up
  assert losses(tmp_path) == reference


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_preemption_signal_saves_and_exits_0(corpus, reference, tmp_path, signum):
  proc = start(corpus, tmp_path)
  wait_for(lambda: logged_step(tmp_path) >= 30, proc, 'step 30')
  sent = time.time()
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == 0, stderr[-2000:]
  assert time.time() - sent < 30
  stopped_at = logged_step(tmp_path)
  assert stopped_at < 120 and steps_on_disk(tmp_path)[-1] == stopped_at
  assert f'at step {stopped_at}: checkpoint saved' in stderr
  out = run(corpus, tmp_path)
  assert f'resumed from the checkpoint at step {stopped_at}' in out.stderr
  assert losses(tmp_path) == reference


def corrupt(step_dir: pathlib.Path) -> None:
  """Truncates every file of a checkpoint, as a crash of the filesystem or a copy would."""
  for path in step_dir.rglob('*'):
    if path.is_file():
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(corpus, reference, tmp_path):
  run(corpus, tmp_path, '--config.num_train_steps=60')
  assert steps_on_disk(tmp_path) == [20, 40, 60]
  corrupt(tmp_path / 'checkpoints' / '60')
  out = run(corpus, tmp_path, '--config.num_train_steps=80')
  assert 'the checkpoint at step 60 cannot be read' in out.stderr
  assert 'resumed from the checkpoint at step 40' in out.stderr
  assert [
    p.name.split('.')[0] for p in (tmp_path / 'checkpoints').iterdir() if 'unreadable' in p.name
  ] == ['60']  # moved aside, not deleted
  assert losses(tmp_path) == {s: v for s, v in reference.items() if s <= 80}


def test_only_checkpoint_unreadable_refuses_to_start_from_scratch(corpus, tmp_path):
  run(corpus, tmp_path, '--config.num_train_steps=20')
  corrupt(tmp_path / 'checkpoints' / '20')
  out = run(corpus, tmp_path, check=False)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'refusing to start the run from scratch' in out.stderr
  assert [p.name for p in (tmp_path / 'checkpoints').iterdir() if 'unreadable' in p.name]


# A learning rate of 1e30 without clipping: the first update makes the second loss NaN.
DIVERGE = (
  '--config.optim.learning_rate=1e30',
  '--config.optim.warmup_steps=0',
  '--config.optim.grad_clip_norm=0',
)


def test_nan_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
  out = run(corpus, tmp_path, *DIVERGE, '--config.checkpoint_every_steps=1', check=False)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'non-finite training loss (nan) or gradient norm' in out.stderr
  assert 'at step 2, on training batch 1' in out.stderr
  assert 'the last checkpoint, step 1, predates it' in out.stderr
  assert steps_on_disk(tmp_path) == [1]


def test_nan_skip_policy_counts_skipped_steps(corpus, tmp_path):
  out = run(corpus, tmp_path, *DIVERGE, '--config.nan_policy=skip', '--config.num_train_steps=10')
  logged = [m for m in read_jsonl(tmp_path / 'metrics.jsonl') if 'train/skipped_steps' in m]
  assert logged[0]['train/skipped_steps'] == 0.0  # step 1 was finite
  assert sum(m['train/skipped_steps'] for m in logged) == 9.0
  assert 'Traceback' not in out.stderr


def test_unwritable_workdir_fails_before_training(corpus, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('')
  out = run(corpus, blocker / 'run', check=False)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'is not writable' in out.stderr and 'step 1' not in out.stderr


def test_failed_save_is_reported_and_earlier_checkpoints_stay(corpus, tmp_path, monkeypatch):
  save = ocp.CheckpointManager.save
  calls = []

  def full_disk_on_second_save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 2:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_disk_on_second_save)
  cfg = tiny_config(corpus, num_train_steps=9, checkpoint_every_steps=3)
  with pytest.raises(
    RunError,
    match=r'step 6 .* No space left on device; the earlier '
    r'checkpoints \(steps \[3\]\) are intact',
  ):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert steps_on_disk(tmp_path) == [3]
  with pytest.raises(ConfigError, match='is not writable'):
    train.train_and_evaluate(cfg, '/proc/ar_jax_cannot_be_here')
