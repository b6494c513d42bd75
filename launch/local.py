"""N processes on this machine joined by jax.distributed over CPU (gloo): how multi-host code
is run and tested without a cluster.

  python -m launch.local --num_processes=2 --devices_per_process=2 -- \
      python -m ar_jax.main --config=experiments/quickstart.py --workdir=workdirs/mp

Each process gets --coordinator_address/--num_processes/--process_id and simulated CPU
devices. If one process fails, the others are stopped after a grace period, so a dead peer
never leaves the rest hanging; the launcher exits with the first failure's code.
"""

import os
import signal
import socket
import subprocess
import sys
import time

from absl import app, flags, logging

flags.DEFINE_integer('num_processes', 2, 'Processes to start.')
flags.DEFINE_integer('devices_per_process', 1, 'Simulated CPU devices in each process.')
flags.DEFINE_float('grace_seconds', 20.0, 'How long the others may take to stop after a failure.')


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(command: list[str], num_processes: int, devices_per_process: int, grace: float) -> int:
  address = f'127.0.0.1:{free_port()}'
  env = {
    **os.environ,
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_per_process}',
  }
  procs = [
    subprocess.Popen(
      [
        *command,
        f'--coordinator_address={address}',
        f'--num_processes={num_processes}',
        f'--process_id={i}',
      ],
      env=env,
    )
    for i in range(num_processes)
  ]
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
  sys.exit(launch(command, f.num_processes, f.devices_per_process, f.grace_seconds))


if __name__ == '__main__':
  app.run(main)
