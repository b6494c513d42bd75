"""Multi-host runs: one process per host (or per GPU), joined by jax.distributed."""

import logging
import os

import jax
from absl import flags
from absl import logging as absl_logging

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
  """Joins this process to the run's other processes, when there are others.

  Explicit flags win (launch/local.py passes them). Otherwise JAX detects the cluster
  itself under SLURM (srun) and on multi-host TPU VMs. A single process does nothing.
  """
  # A dead peer is noticed within this many seconds, and the others stop instead of hanging.
  timeouts = {'heartbeat_timeout_seconds': 30, 'initialization_timeout': 120}
  if coordinator_address:
    host, _, port = coordinator_address.rpartition(':')
    # The coordinator listens on every interface unless told otherwise: a run whose peers are
    # all on this machine keeps it on the loopback, out of reach of the network.
    local = host in ('127.0.0.1', 'localhost', '[::1]')
    jax.distributed.initialize(
      coordinator_address,
      num_processes,
      process_id,
      coordinator_bind_address=f'{host}:{port}' if local else None,
      **timeouts,
    )
  elif _on_cluster():
    jax.distributed.initialize(**timeouts)
  else:
    return
  log.info(
    'process %d of %d, %d local devices of %d',
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  if jax.process_index() != 0 and not flags.FLAGS['verbosity'].present:
    # Every process logs the same progress: process 0 speaks for the run, the others only warn.
    absl_logging.set_verbosity(absl_logging.WARNING)


def _on_cluster() -> bool:
  slurm_tasks = int(os.environ.get('SLURM_NTASKS', '1'))
  tpu_hosts = os.environ.get('TPU_WORKER_HOSTNAMES', '')
  return slurm_tasks > 1 or ',' in tpu_hosts
