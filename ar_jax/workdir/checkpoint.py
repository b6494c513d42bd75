"""Checkpoints of a run (the only module that imports orbax).

Each step's checkpoint holds the train state (parameters, optimizer state, step, and the
recurrent carry when training is stateful), the data iterator's state and the run's
metadata (resolved config, tokenizer), so a workdir is enough to resume a run or sample
from it. Orbax writes a step into a temporary directory and renames it when complete, so a
process killed mid-save leaves no half-written step behind (its debris is removed on the
next start).

A step that cannot be restored is one of three things, and only the first moves anything:
  damaged     a file missing, truncated or undecodable: the step is moved aside (renamed
              STEP.unreadable.TIME, never deleted) by a trainer, skipped by a reader, and
              the step before it is tried;
  mismatched  readable, but its tree, shapes or dtypes are not what this code and config
              build: the run stops, naming the differing leaves;
  unexplained anything else (out of memory, permissions, a filesystem hiccup, a bug): the
              run stops with the error, and nothing is moved.
"""

import collections
import contextlib
import errno
import gc
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ar_jax.errors import RunError
from ar_jax.workdir import checksums

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO

UNREADABLE = '.unreadable'
# How tensorstore, orbax and json say that a file is missing, cut short or undecodable. A
# byte range past a file's end (OUT_OF_RANGE) is a data file cut short: shapes that do not
# match the config are found before any byte is read (_check_matches).
_DAMAGE = (
  'DATA_LOSS',
  'NOT_FOUND',
  'OUT_OF_RANGE',
  'FAILED_PRECONDITION: Error reading',
  'Truncated',
  'corrupt',
)
_DAMAGE_TYPES = (json.JSONDecodeError, FileNotFoundError, KeyError, UnicodeDecodeError)


class Damaged(Exception):
  """A step whose files cannot be read: what is wrong with them, in one line."""


class Mismatch(RunError):
  """A readable step whose state is not the one this code and config build."""


class Checkpointer:
  """A workdir's checkpoints/ folder; a context manager that closes it on every exit path."""

  def __init__(
    self, workdir: str, *, max_to_keep: int = 1, async_save: bool = True, reader: bool = False
  ):
    """reader=True: restores only, and leaves the folder as it is, a save that a trainer has
    in flight included (the trainer holds the workdir's lock: its debris is its own)."""
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    with _without_orbax_logs():  # it reads every step's metadata: damage is reported later
      self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep,
          enable_async_checkpointing=async_save,
          create=False,  # made by the first save: nothing is written while a run is checked
          cleanup_tmp_directories=not reader,
          read_only=reader,
        ),
        item_handlers={  # named, so that a step's metadata can be read without restoring it
          'state': ocp.StandardCheckpointHandler(),
          'data': ocp.JsonCheckpointHandler(),
          'meta': ocp.JsonCheckpointHandler(),
        },
      )
    self._failed_save: RunError | None = None
    self._saving: int | None = None  # the step of the last save started
    self._confirmed: int | None = None  # the step of the last save known to be on disk
    self._previous_hook = sys.unraisablehook
    sys.unraisablehook = _dropping_orbax_debris(self._previous_hook)

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close(raise_errors=exc[0] is None)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def moved_aside(self) -> list[str]:
    """The names of steps moved aside as unreadable, in this or an earlier run."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(n for n in os.listdir(self.directory) if UNREADABLE in n)

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts writing (asynchronously when enabled); check() or wait() sees it complete. The
    meta records a checksum of every array and of the data state, which restores verify."""
    sums = {'checksums': checksums.of(state), 'data_checksum': checksums.of_json(data_state)}
    meta = {**meta, **sums}
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_state),
      meta=ocp.args.JsonSave(meta),
    )
    self.wait()  # orbax waits for the previous save anyway: its failure is reported as its own
    self._saving = step
    self._reporting_failure(lambda: _check_free_space(self.directory, state), step)
    self._reporting_failure(lambda: self._manager.save(step, args=args), step)

  def check(self) -> None:
    """Raises RunError if the save running in the background has failed (a full disk); cheap
    enough to call at every step."""
    if self._saving != self._confirmed and not self._manager.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Blocks until the last save is on disk; raises RunError if it failed."""
    self._reporting_failure(self._manager.wait_until_finished, self._saving)
    self._confirmed = self._saving

  def close(self, raise_errors: bool = False) -> None:
    """Completes an in-flight save and stops orbax's threads, so nothing runs during
    interpreter shutdown. A failed save already reported is not reported again."""
    try:
      self.wait()
    except RunError:
      if raise_errors:
        raise
    finally:
      with contextlib.suppress(Exception):
        self._manager.close()
      gc.collect()  # orbax's abandoned coroutines are finalised while the filter is in place
      sys.unraisablehook = self._previous_hook

  def restore(
    self, step: int, abstract_state: Any, params_only: bool = False
  ) -> tuple[Any, dict, dict]:
    """(state, data_state, meta) at `step`, placed as abstract_state's shardings say.

    With params_only, abstract_state is the parameters' tree alone, and so is what comes back
    (data_state and meta empty): a reader needs neither the optimizer's moments (twice the
    parameters' memory) nor the data iterator. Raises Damaged, or RunError for a mismatched
    or unexplained failure.
    """
    wanted = {'params': abstract_state} if params_only else abstract_state
    with _without_orbax_logs():  # a failure is classified and reported here, once
      try:
        saved = self._manager.item_metadata(step)['state']
        saved = getattr(saved, 'tree', saved)
        saved = {'params': saved['params']} if params_only else saved
      except Exception as e:
        raise _classified(step, e, self.directory) from e
      _check_matches(step, saved, wanted, self.directory)
      try:
        if params_only:
          params = self._read_params(step, wanted)
          meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
          _verify(step, {'params': params['params']}, {}, meta.meta)
          return params['params'], {}, {}
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
          ),
        )
      except Exception as e:
        raise _classified(step, e, self.directory) from e
      _verify(step, restored.state, restored.data, restored.meta)
    return restored.state, restored.data, restored.meta

  def _read_params(self, step: int, wanted: dict) -> dict:
    reader = ocp.PyTreeCheckpointer()
    try:
      return reader.restore(
        os.path.join(self._step_dir(step), 'state'),
        args=ocp.args.PyTreeRestore(
          item=wanted,
          restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
          partial_restore=True,
        ),
      )
    finally:
      reader.close()

  def restore_latest(
    self, abstract_state: Any, *, move_aside: bool, params_only: bool = False
  ) -> tuple[int, Any, dict, dict] | None:
    """The newest readable checkpoint as (step, state, data_state, meta); None if there is none.

    A damaged step is skipped with a warning, and moved aside when `move_aside` (a trainer,
    which will write new steps over its number; readers leave the folder as it is). With
    several processes they agree on each step's outcome and only process 0 moves it.
    """
    for step in reversed(self.steps()):
      try:
        restore = lambda: self.restore(step, abstract_state, params_only)  # noqa: B023
        return (step, *_agreed(restore, step))
      except Damaged as e:
        where = os.path.join(self.directory, str(step))
        if move_aside:
          aside = f'{where}{UNREADABLE}.{time.strftime("%Y%m%d-%H%M%S")}'
          if jax.process_index() == 0:
            os.rename(where, aside)
          _barrier(f'ar_jax_moved_aside_{step}')
          self._manager.reload()
          log.warning('%s; moved it to %s and trying the one before it', e, aside)
        else:
          log.warning('%s; trying the one before it', e)
    return None

  def _reporting_failure(self, fn, step) -> None:
    if self._failed_save is not None:  # orbax keeps raising it; it was reported once
      raise RunError(str(self._failed_save)) from self._failed_save
    try:
      fn()
    except Exception as e:  # disk full (tensorstore raises ValueError), quota, a vanished mount
      kept = [s for s in self.steps() if s != step and os.path.isdir(self._step_dir(s))]
      cause = str(e).splitlines()[0] if str(e) else type(e).__name__
      cause = cause if len(cause) < 200 else cause[:200] + '...'
      with contextlib.suppress(OSError):
        cause += f'; {shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free there'
      self._failed_save = RunError(
        f'saving the checkpoint at step {step} to {self.directory} failed ({cause}); '
        + (
          f'the earlier checkpoints (steps {kept}) are intact' if kept else 'none was saved before'
        )
        + ': free space or fix the path, then start again with the same workdir'
      )
      raise self._failed_save from e

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))


def _classified(step: int, e: Exception, directory: str) -> Exception:
  """Damaged when the error (or one it came from) says a file is missing or undecodable."""
  chain, x = [], e
  while x is not None and len(chain) < 10:
    chain.append(x)
    x = x.__cause__ or x.__context__
  first_line = lambda x: str(x).splitlines()[0] if str(x) else type(x).__name__
  damage = next(
    (x for x in chain if isinstance(x, _DAMAGE_TYPES) or any(d in str(x) for d in _DAMAGE)),
    None,
  )
  if damage is not None:
    return Damaged(
      f'the checkpoint at step {step} cannot be read ({type(damage).__name__}: '
      f'{first_line(damage)[:300]})'
    )
  return RunError(
    f'restoring the checkpoint at step {step} from {directory} failed ({type(e).__name__}: '
    f'{first_line(chain[-1])[:300]}); this does not look like a damaged file (out of memory, '
    'permissions, the filesystem?), so nothing was moved: fix the cause and start again'
  )


def _check_matches(step: int, saved: Any, abstract: Any, directory: str) -> None:
  """Raises RunError naming the leaves whose presence, shape or dtype differ; Damaged when
  the step's metadata lists no arrays at all."""
  saved_flat = ocp.tree.to_flat_dict(saved or {}, sep='/')
  if not saved_flat:
    raise Damaged(f'the checkpoint at step {step} cannot be read (its array metadata is empty)')
  wanted = {k: v for k, v in ocp.tree.to_flat_dict(abstract, sep='/').items() if v is not None}
  describe = lambda v: f'{v.dtype}{list(v.shape)}'
  diffs = {k: 'missing in the checkpoint' for k in wanted.keys() - saved_flat.keys()}
  diffs |= {k: 'in the checkpoint only' for k in saved_flat.keys() - wanted.keys()}
  diffs |= {
    k: f'checkpoint {describe(saved_flat[k])}, config {describe(v)}'
    for k, v in wanted.items()
    if k in saved_flat
    and (tuple(saved_flat[k].shape) != tuple(v.shape) or np.dtype(saved_flat[k].dtype) != v.dtype)
  }
  if diffs:
    counts = collections.Counter(k.split('/')[0] for k in diffs)
    first = sorted(diffs, key=lambda k: (not k.startswith('params'), k))[:3]  # params read best
    examples = '; '.join(f'{k}: {diffs[k]}' for k in first)
    raise Mismatch(
      f'the checkpoint at step {step} in {directory} does not match the state this code and '
      f'config build: {", ".join(f"{n} leaves of {top}" for top, n in sorted(counts.items()))} '
      f'differ ({examples}). Nothing was moved. Resume with the config the run was started '
      "with (its config.json; an optimizer or model change alters the state's shapes), or "
      'start this config in a new workdir'
    )


def _verify(step: int, state: Any, data_state: dict, meta: dict) -> None:
  """Raises Damaged when a restored array or the data state is not what was saved (a byte
  changed on disk: tensorstore reads raw array chunks without checking them). Checkpoints
  written before checksums were recorded are not checked."""
  saved = meta.get('checksums')
  if saved is None:
    return
  found = checksums.of(state)
  differ = sorted(k for k, v in found.items() if saved.get(k) != v)
  if differ:
    raise Damaged(
      f'the checkpoint at step {step} cannot be read (its data differ from what was saved: '
      f'{len(differ)} arrays fail their checksums, {", ".join(differ[:3])})'
    )
  if data_state and meta.get('data_checksum') not in (None, checksums.of_json(data_state)):
    raise Damaged(f'the checkpoint at step {step} cannot be read (its data state was changed)')


def _agreed(restore, step: int):
  """restore(), with every process's outcome agreed: one damaged or failed shard is every
  process's (0 restored, 1 damaged, 2 failed otherwise)."""
  if jax.process_count() == 1:
    return restore()
  outcome, error = 0, None
  try:
    result = restore()
  except Damaged as e:
    outcome, error = 1, e
  except Exception as e:
    outcome, error = 2, e
  worst = int(np.max(multihost_utils.process_allgather(np.array(outcome))))
  if worst == outcome and error is not None:
    raise error
  if worst == 1:
    raise Damaged(f'the checkpoint at step {step} cannot be read by another process')
  if worst == 2:
    raise RunError(f'another process failed to restore the checkpoint at step {step}; see its log')
  return result


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _check_free_space(directory: str, state: Any) -> None:
  """Raises OSError(ENOSPC) before a save that cannot fit: the bytes this process writes (its
  shards, one copy of each) against the free space where they go."""
  needed = sum(
    shard.data.nbytes
    for x in jax.tree.leaves(state)
    for shard in x.addressable_shards
    if shard.replica_id == 0
  )
  os.makedirs(directory, exist_ok=True)
  usage = shutil.disk_usage(directory)
  if usage.total and usage.free < needed:  # some network mounts report no sizes at all
    raise OSError(errno.ENOSPC, f'No space left: it needs {needed / 2**20:.1f} MiB')


def _dropping_orbax_debris(hook):
  """sys.unraisablehook, less what orbax's asynchronous machinery leaves when a read or write
  fails: its abandoned coroutines, and tensorstore's callbacks into an event loop already
  closed (a traceback each, by the hundred). The failure itself is raised and reported once."""

  def filtered(unraisable):
    value = unraisable.exc_value
    closed_loop = isinstance(value, RuntimeError) and str(value) == 'Event loop is closed'
    if not (closed_loop or 'orbax' in repr(unraisable.object)):
      hook(unraisable)

  return filtered


class _NotFromOrbax(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return '/orbax/' not in record.pathname


@contextlib.contextmanager
def _without_orbax_logs():
  handlers = logging.getLogger().handlers
  quiet = _NotFromOrbax()
  for h in handlers:
    h.addFilter(quiet)
  try:
    yield
  finally:
    for h in handlers:
      h.removeFilter(quiet)
