"""One writer per workdir (ar_jax/lock.py): a second trainer refuses in one line naming the
first, a killed trainer's lock does not block the next, a lock from another host expires
only when its heartbeat is old, and readers take no lock and disturb no save in flight."""

import json
import os
import signal
import socket
import subprocess
import time

import pytest

from ar_jax.errors import RunError
from ar_jax.workdir import lock as lock_lib
from tests.faults.runner import (
  TIMEOUT,
  command,
  env,
  logged_step,
  losses,
  run,
  run_command,
  sample_command,
  started,
  steps_on_disk,
  wait_for,
)
from tests.helpers import REPO, read_jsonl, start


@pytest.mark.slow
@pytest.mark.parametrize('apart', ['at once', 'while the first trains'])
def test_two_trainers_on_one_workdir_one_refuses_the_other_loses_nothing(
  corpus, reference, tmp_path, apart
):
  args = (*command(corpus, tmp_path), '--config.num_train_steps=60')
  pipes = dict(cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  first = start(args, **pipes)
  paused = apart != 'at once'
  if paused:  # the first holds its lock mid-run (paused, so a fast run cannot finish first)
    wait_for(lambda: logged_step(tmp_path) >= 5, first, 'step 5')
    first.send_signal(signal.SIGSTOP)
  second = start(args, **pipes)
  if paused:
    second.wait(timeout=TIMEOUT)
    first.send_signal(signal.SIGCONT)
  outs = [p.communicate(timeout=TIMEOUT) for p in (first, second)]
  codes = sorted(p.returncode for p in (first, second))
  assert codes == [0, 1], outs
  refused = next(err for p, (_, err) in zip((first, second), outs, strict=True) if p.returncode)
  assert refused.count('error: ') == 1 and 'Traceback' not in refused
  assert f'workdir {tmp_path} is in use by a trainer with pid' in refused
  assert f"on host '{socket.gethostname()}'" in refused
  # The trainer that ran lost nothing: every step once, its evaluation, every checkpoint.
  assert losses(tmp_path) == {s: v for s, v in reference.items() if s <= 60}
  assert [m['step'] for m in read_jsonl(tmp_path / 'metrics.jsonl') if 'eval/loss' in m] == [60]
  assert steps_on_disk(tmp_path) == [20, 40, 60]
  assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == ['20', '40', '60']
  assert (tmp_path / 'final.json').exists() and not (tmp_path / lock_lib.NAME).exists()


def test_a_killed_trainers_lock_does_not_block_the_next(corpus, reference, tmp_path):
  with started(corpus, tmp_path) as proc:
    wait_for(lambda: logged_step(tmp_path) >= 25, proc, 'step 25')
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT)
  held = json.loads((tmp_path / lock_lib.NAME).read_text())
  assert held['pid'] == proc.pid  # left behind by kill -9
  out = run(corpus, tmp_path)
  assert f'broke the lock of a trainer with pid {proc.pid}' in out.stderr
  assert losses(tmp_path) == reference


def write_lock(workdir, **fields):
  record = {
    'purpose': 'a trainer',
    'host': 'node-7',
    'pid': 4242,
    'boot': 'another',
    'started': 'earlier',
    'flock': True,
    'token': 'theirs',
    'heartbeat': time.time(),
    **fields,
  }
  (workdir / lock_lib.NAME).write_text(json.dumps(record))


def test_a_lock_on_another_host_holds_until_its_heartbeat_is_stale(tmp_path, caplog):
  write_lock(tmp_path, heartbeat=time.time() - 10)
  with pytest.raises(RunError, match=r"pid 4242 on host 'node-7', started earlier \(heartbeat 1"):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  write_lock(tmp_path, heartbeat=time.time() - lock_lib.STALE_SECONDS - 1)
  lock = lock_lib.WorkdirLock(str(tmp_path))
  with caplog.at_level('WARNING', logger='ar_jax'):
    lock.acquire()
  try:
    assert "broke the lock of a trainer with pid 4242 on host 'node-7'" in caplog.text
    assert json.loads((tmp_path / lock_lib.NAME).read_text())['pid'] == os.getpid()
    # Held now: a second taker (on this host) refuses.
    with pytest.raises(RunError, match=f'in use by a trainer with pid {os.getpid()}'):
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
  finally:
    lock.release()
  assert not (tmp_path / lock_lib.NAME).exists()
  assert os.listdir(tmp_path) == []  # no temporary or stale files left


def test_without_flock_a_dead_pid_on_this_host_is_stale(tmp_path):
  """Where the filesystem has no flock, the recorded pid and its start time decide: a pid
  that no longer runs, or now runs another process, holds nothing."""
  me = dict(host=socket.gethostname(), boot=lock_lib._boot_id(), flock=False)
  write_lock(tmp_path, **me, pid=os.getpid(), start_ticks=lock_lib._start_ticks(os.getpid()))
  with pytest.raises(RunError, match='in use'):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  for dead in ({'start_ticks': 1}, {'pid': 2**22 + 7}):  # a reused pid, a pid that is gone
    write_lock(tmp_path, **me, **{'pid': os.getpid(), **dead})
    lock = lock_lib.WorkdirLock(str(tmp_path))
    lock.acquire()
    lock.release()


def test_a_lock_taken_away_stops_the_holder_at_its_next_check(tmp_path, monkeypatch):
  monkeypatch.setattr(lock_lib, 'HEARTBEAT_SECONDS', 0.05)
  lock = lock_lib.WorkdirLock(str(tmp_path))
  lock.acquire()
  try:
    lock.check()
    (tmp_path / lock_lib.NAME).unlink()  # someone judged it stale and broke it
    write_lock(tmp_path)
    deadline = time.time() + 10
    while lock._lost is None and time.time() < deadline:
      time.sleep(0.05)
    with pytest.raises(RunError, match='was taken from this run'):
      lock.check()
  finally:
    lock.release()
  assert json.loads((tmp_path / lock_lib.NAME).read_text())['token'] == 'theirs'  # left alone


def test_readers_take_no_lock_and_leave_a_save_in_flight_alone(corpus, tmp_path):
  run(corpus, tmp_path, '--config.num_train_steps=20')
  in_flight = tmp_path / 'checkpoints' / '40.orbax-checkpoint-tmp-1234'
  in_flight.mkdir()
  (in_flight / 'partial').write_text('a trainer is writing this')
  with lock_lib.held(str(tmp_path)):  # as a trainer holds it while it runs
    run_command(sample_command(tmp_path, '--prompt=to', '--max_new_tokens=4'))
    run(corpus, tmp_path, '--config.num_train_steps=20', '--mode=eval')
  assert (in_flight / 'partial').exists()
  assert steps_on_disk(tmp_path) == [20]
