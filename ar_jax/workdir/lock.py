"""One writer per workdir: the lock a trainer (or an import) takes before it writes anything.

WORKDIR/lock names its holder: host, pid, boot, start time and a heartbeat the holder
rewrites every HEARTBEAT_SECONDS. It is created whole by a hard link from a file already
written (atomic on local filesystems and on NFS, where O_EXCL once was not), and the holder
keeps an flock on it while it lives. A second trainer finds the file and decides:

  same host   the holder is alive if the flock is still held (the kernel drops it when a
              process dies, kill -9 included), or, where the filesystem has no flock, if its
              pid runs with the start time and boot it recorded;
  other host  the holder is alive while its heartbeat is younger than STALE_SECONDS: a host
              that died (or lost the filesystem) cannot say so.

A live holder is named in a one-line refusal; a dead one's lock is broken (renamed aside,
then removed) with a warning. On a shared filesystem the lock guarantees one trainer per
workdir among hosts that see the same files and whose clocks agree to well within
STALE_SECONDS; it cannot stop a second trainer that ignores it, nor tell a host that
stopped heartbeating for STALE_SECONDS (a long filesystem stall) from a dead one: the
holder then finds its lock gone at its next heartbeat, and the run stops at its next save.
Readers (sample, --mode=eval, study, lm_harness) take no lock: orbax renames a step into
place only when it is complete, so they never see half of one.
"""

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator

from ar_jax.errors import ConfigError, RunError

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO

NAME = 'lock'
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0  # ten missed heartbeats: a holder on another host is presumed dead
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _boot_id() -> str:
  try:
    with open('/proc/sys/kernel/random/boot_id') as f:
      return f.read().strip()
  except OSError:
    return ''


def _start_ticks(pid: int) -> int | None:
  """The process's start time in clock ticks since boot (None if it does not run): a pid
  reused by another process has another start time."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return int(f.read().rpartition(')')[2].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _flock(fd: int) -> bool | None:
  """True if this took the flock, False if another process holds it, None if the
  filesystem has none."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return True
  except OSError as e:
    if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
      return False
    if e.errno in _NO_FLOCK:
      return None
    raise


class WorkdirLock:
  """The lock on one workdir, held from acquire() to release()."""

  def __init__(self, workdir: str, purpose: str = 'a trainer'):
    self.workdir = workdir
    self.path = os.path.join(workdir, NAME)
    self.purpose = purpose
    self._fd: int | None = None
    self._record: dict = {}
    self._lost: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def describe(self, record: dict) -> str:
    age = time.time() - record.get('heartbeat', 0)
    return (
      f'{record.get("purpose", "a trainer")} with pid {record.get("pid")} on host '
      f'{record.get("host")!r}, started {record.get("started")} (heartbeat {age:.0f} s ago)'
    )

  def acquire(self) -> None:
    """Takes the lock, breaking a dead holder's; raises RunError naming a live one."""
    token = uuid.uuid4().hex
    tmp = f'{self.path}.{token}.tmp'
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
      raise ConfigError(f'workdir {self.workdir} is not writable: {e}') from e
    try:
      # Locked before it is linked into place: no one ever sees the lock unheld.
      has_flock = _flock(fd) is not None
      self._record = {
        'purpose': self.purpose,
        'host': socket.gethostname(),
        'pid': os.getpid(),
        'boot': _boot_id(),
        'start_ticks': _start_ticks(os.getpid()),
        'started': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
        'flock': has_flock,
        'token': token,
      }
      self._write(fd)
      for _ in range(5):  # a dead holder's lock broken, then taken, by another at the same time
        if self._link(tmp):
          self._fd, fd = fd, None
          break
        holder = self._read()
        if holder is not None and not self._dead(holder):
          raise RunError(
            f'workdir {self.workdir} is in use by {self.describe(holder)}: two writers would '
            "lose each other's metrics and checkpoints. Wait for it to finish, or stop it and "
            f'start again; if it died on another host, its lock expires {STALE_SECONDS:.0f} s '
            f'after its last heartbeat (or remove {self.path} once you are sure)'
          )
        if holder is not None:
          self._break(holder)
      else:
        raise RunError(f'could not take the lock {self.path}: others keep taking it')
    finally:
      if fd is not None:
        os.close(fd)
      with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    self._thread = threading.Thread(target=self._heartbeat, name='ar_jax_lock', daemon=True)
    self._thread.start()

  def _write(self, fd: int) -> None:
    data = json.dumps({**self._record, 'heartbeat': time.time()}).encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)

  def _link(self, tmp: str) -> bool:
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError as e:  # a filesystem without hard links: O_EXCL, then the same content
      if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
        raise
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    os.close(fd)
    os.replace(tmp, self.path)
    return True

  def _read(self) -> dict | None:
    """The holder's record; None if the lock vanished meanwhile. A record being rewritten is
    read again; one that never parses is treated as alive (refused, not broken)."""
    for _ in range(20):
      try:
        with open(self.path) as f:
          return json.loads(f.read())
      except FileNotFoundError:
        return None
      except (json.JSONDecodeError, UnicodeDecodeError):
        time.sleep(0.05)
    return {'host': '?', 'pid': '?', 'started': '? (its lock file is unreadable)'}

  def _dead(self, holder: dict) -> bool:
    if holder.get('host') != socket.gethostname():
      return time.time() - holder.get('heartbeat', 0) > STALE_SECONDS
    if holder.get('boot') != _boot_id():
      return True  # this host has rebooted since
    if holder.get('flock'):
      try:
        fd = os.open(self.path, os.O_RDONLY)
      except FileNotFoundError:
        return True
      try:
        held = _flock(fd)
        return bool(held)  # took it: nobody holds it
      finally:
        os.close(fd)
    pid = holder.get('pid')
    ticks = _start_ticks(pid) if isinstance(pid, int) else None
    return ticks is None or ticks != holder.get('start_ticks')

  def _break(self, holder: dict) -> None:
    """Moves a dead holder's lock aside (one of several breakers wins the rename) and
    removes it; a lock that turns out not to be the one judged dead is put back."""
    aside = f'{self.path}.stale.{uuid.uuid4().hex}'
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    try:
      with open(aside) as f:
        moved = json.loads(f.read())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
      moved = {}
    if moved.get('token') != holder.get('token'):
      with contextlib.suppress(FileExistsError):
        os.link(aside, self.path)
    else:
      log.warning(
        'workdir %s: broke the lock of %s, which is gone', self.workdir, self.describe(holder)
      )
    os.unlink(aside)

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      try:
        if os.stat(self.path).st_ino != os.fstat(self._fd).st_ino:
          raise FileNotFoundError(self.path)
        self._write(self._fd)
      except OSError as e:
        self._lost = f'the lock {self.path} was taken from this run ({e.__class__.__name__})'
        return

  def check(self) -> None:
    """Raises RunError once the lock is known lost: the run stops before it writes more."""
    if self._lost:
      raise RunError(
        f'{self._lost}: another process may be writing workdir {self.workdir}; stopped '
        'before writing to it again'
      )

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._fd is None:
      return
    with contextlib.suppress(OSError):
      if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
        os.unlink(self.path)
    os.close(self._fd)
    self._fd = None


@contextlib.contextmanager
def held(workdir: str, purpose: str = 'a trainer') -> Iterator[WorkdirLock | None]:
  """The workdir's lock for the block, taken by process 0 of a run (which speaks for all of
  its processes); every process raises the same error when it cannot be taken."""
  import jax  # Imported here: the lock itself needs no jax.

  lock = WorkdirLock(workdir, purpose) if jax.process_index() == 0 else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except RunError as e:
      error = e
  if jax.process_count() > 1:
    import numpy as np
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.array(error is not None))
    if error is None and np.any(failed):
      error = RunError(f'process 0 could not take the lock on workdir {workdir}; see its log')
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
