"""Checkpoints of a run (the only module that imports orbax).

Each step's checkpoint holds the train state (parameters, optimizer state, step, and the
recurrent carry when training is stateful), the data iterator's state and the run's
metadata (resolved config, tokenizer), so a workdir is enough to resume a run or sample
from it. Orbax writes a step into a temporary directory and renames it when complete, so a
process killed mid-save leaves no half-written step behind (its debris is removed on the
next start); a step that is complete on disk but unreadable is moved aside, never deleted.
"""

import os
import time
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from ar_jax.errors import RunError

UNREADABLE = '.unreadable'


class Checkpointer:
  def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True,
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts writing (asynchronously when enabled); a later save or wait() completes it."""
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta),
    )
    self._reporting_failure(lambda: self._manager.save(step, args=args), step)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
    """(state, data_state, meta) at `step`, the state placed as abstract_state's shardings say."""
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    return restored.state, restored.data, restored.meta

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict] | None:
    """The newest readable checkpoint as (step, state, data_state, meta); None if there is none.

    A checkpoint that cannot be read (truncated, corrupted) is renamed STEP.unreadable with a
    warning, and the one before it is tried. If checkpoints exist but none can be read, this
    raises rather than let the run silently start from scratch.
    """
    tried = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return (step, *self.restore(step, abstract_state))
      except Exception as e:  # orbax and tensorstore raise many types for a damaged file
        tried.append(step)
        aside = f'{os.path.join(self.directory, str(step))}{UNREADABLE}.{int(time.time())}'
        os.rename(os.path.join(self.directory, str(step)), aside)
        self._manager.reload()
        logging.warning(
          'the checkpoint at step %d cannot be read (%s: %s); moved it to %s and falling back '
          'to the one before it',
          step,
          type(e).__name__,
          str(e).splitlines()[0] if str(e) else '',
          aside,
        )
    if tried:
      raise RunError(
        f'none of the checkpoints in {self.directory} (steps {tried}) can be read; they were '
        f'moved aside as *{UNREADABLE}.*; refusing to start the run from scratch over them'
      )
    return None

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises RunError if it failed."""
    self._reporting_failure(self._manager.wait_until_finished, self.latest_step())

  def close(self) -> None:
    self._manager.close()

  def _reporting_failure(self, fn, step) -> None:
    try:
      fn()
    except OSError as e:  # disk full, quota, permissions, a vanished mount
      kept = sorted(s for s in self._manager.all_steps() if s != step)
      raise RunError(
        f'saving the checkpoint at step {step} to {self.directory} failed: {e}; the earlier '
        f'checkpoints (steps {kept}) are intact: free space or fix the path, then start again '
        'with the same workdir'
      ) from e
