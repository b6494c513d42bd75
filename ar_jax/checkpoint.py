"""Checkpoints of a run (the only module that imports orbax).

Each step's checkpoint holds the train state (parameters, optimizer state, step), the data
iterator's state and the run's metadata (resolved config, tokenizer), so a workdir is
enough to resume a run or sample from it.
"""

import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
  def __init__(self, workdir: str, *, max_to_keep: int, async_save: bool = True):
    self._manager = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts writing (asynchronously when enabled); a later save or wait() completes it."""
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta),
      ),
    )

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

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
