"""N processes on this machine joined by jax.distributed over CPU (gloo): how multi-host code
is run and tested without a cluster.

  python -m launch.local --num_processes=2 --devices_per_process=2 -- \
      python -m ar_jax.main --config=experiments/quickstart.py --workdir=workdirs/mp

Each process gets --coordinator_address/--num_processes/--process_id and simulated CPU
devices. Process 0 speaks for the run on this console; every process's output (gloo's
connection lines too) goes to PROCESS_LOGS/process_N.log. If one process fails, its last lines are
shown and the others are stopped after a grace period, so a dead peer never leaves the rest
hanging; the launcher exits with the first failure's code.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import IO

from absl import app, flags, logging

flags.DEFINE_integer('num_processes', 2, 'Processes to start.')
flags.DEFINE_integer('devices_per_process', 1, 'Simulated CPU devices in each process.')
flags.DEFINE_float('grace_seconds', 20.0, 'How long the others may take to stop after a failure.')
flags.DEFINE_string('process_logs', '', 'Folder for process_N.log; by default a new temporary one.')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(
  command: list[str], num_processes: int, devices_per_process: int, grace: float, log_dir: str
) -> int:
  address = f'127.0.0.1:{free_port()}'
  os.makedirs(log_dir, exist_ok=True)
  logs = [os.path.join(log_dir, f'process_{i}.log') for i in range(num_processes)]
  logging.info('every process logs to %s', os.path.join(log_dir, 'process_N.log'))
  # The caller's XLA flags are kept; only the device count is this launcher's.
  flags = [
    f for f in os.environ.get('XLA_FLAGS', '').split() if 'host_platform_device_count' not in f
  ]
  flags.append(f'--xla_force_host_platform_device_count={devices_per_process}')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ' '.join(flags)}
  procs = [
    subprocess.Popen(
      [
        *command,
        f'--coordinator_address={address}',
        f'--num_processes={num_processes}',
        f'--process_id={i}',
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      errors='replace',
    )
    for i in range(num_processes)
  ]
  files = [open(path, 'a') for path in logs]  # noqa: SIM115 - closed below
  relays = [
    threading.Thread(target=_relay, args=(pipe, log, lock, echo if i == 0 else None), daemon=True)
    for i, (p, log) in enumerate(zip(procs, files, strict=True))
    for lock in [threading.Lock()]  # a process's two streams share its log
    for pipe, echo in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))
  ]
  for t in relays:
    t.start()
  try:
    code = _wait(procs, grace)
  finally:
    for t in relays:
      t.join(timeout=5)  # the pipes close when the processes end
    for f in files:
      f.close()
  for i, p in enumerate(procs):
    if p.returncode not in (0, -signal.SIGKILL) and i > 0:  # process 0's lines were shown
      with open(logs[i]) as f:
        tail = f.readlines()[-20:]
      sys.stderr.write(f'--- the last lines of {logs[i]}:\n{"".join(tail)}')
  return code


def _relay(pipe: IO[str], log: IO[str], lock: threading.Lock, echo: IO[str] | None) -> None:
  """Copies a process's lines to its log, and process 0's to the console without gloo's."""
  for line in pipe:
    with lock:
      log.write(line)
      log.flush()
    if echo is not None and not line.startswith('[Gloo]'):
      echo.write(line)
      echo.flush()


def _wait(procs: list[subprocess.Popen], grace: float) -> int:
  forward = lambda signum, frame: [p.send_signal(signum) for p in procs if p.poll() is None]
  for s in (signal.SIGTERM, signal.SIGINT):  # preemption reaches every process
    signal.signal(s, forward)
  while True:
    codes = [p.poll() for p in procs]
    failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0)]
    if failed:
      return _stop_others(procs, failed, grace)
    if all(code == 0 for code in codes):
      return 0
    time.sleep(0.2)


def _stop_others(procs, failed: list[tuple[int, int]], grace: float) -> int:
  described = ', '.join(f'process {i} exited with code {code}' for i, code in failed)
  logging.error('%s; stopping the other processes', described)
  deadline = time.time() + grace
  while time.time() < deadline and any(p.poll() is None for p in procs):
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  return failed[0][1] if failed[0][1] > 0 else 128 - failed[0][1]


def main(argv):
  command = argv[1:]
  if not command:
    sys.exit('usage: python -m launch.local [flags] -- COMMAND ...')
  f = flags.FLAGS
  log_dir = f.process_logs or tempfile.mkdtemp(prefix='launch_local_')
  sys.exit(launch(command, f.num_processes, f.devices_per_process, f.grace_seconds, log_dir))


if __name__ == '__main__':
  app.run(main)
