"""A workdir is a run: its history and checks (history), the lock of its one writer (lock),
and its checkpoints (checkpoint, verified by checksums)."""

from ar_jax.workdir.history import (
  HISTORY,
  RUN_DEFINING,
  changes,
  check_config,
  check_fresh_start,
  load,
  prepare,
  read_params,
  restore,
  unfinished,
  write_final,
)

__all__ = [
  'HISTORY',
  'RUN_DEFINING',
  'changes',
  'check_config',
  'check_fresh_start',
  'load',
  'prepare',
  'read_params',
  'restore',
  'unfinished',
  'write_final',
]
