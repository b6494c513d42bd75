"""A workdir is one run: the checks made before anything is written into it, its history, the
files that say what it is (config.json, tokenizer.json) and that it finished (final.json), and
opening one to read its latest parameters.

A run's history (metrics.jsonl, final.json, checkpoints moved aside as unreadable) is never
silently replaced: a workdir that holds one but no checkpoint to resume from is refused,
unless the user asks for a restart, which first moves the old history into a folder of its
own.
"""

import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from ar_jax import models, optim, state
from ar_jax.data import tokenizers
from ar_jax.errors import ConfigError, RunError, check
from ar_jax.monitor import writers
from ar_jax.parallel import sharding
from ar_jax.workdir import checkpoint

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO

# Fields that define what a workdir's checkpoints are: a different value cannot resume it.
RUN_DEFINING = ('model', 'data', 'seed', 'batch_size')
# What a restart moves into WORKDIR/previous.TIME/: the record of the run it replaces (and
# checkpoints/*.unreadable.*, into previous.TIME/checkpoints/).
HISTORY = ('metrics.jsonl', 'final.json', 'tensorboard', 'samples.txt')


def check_config(config: ml_collections.ConfigDict, workdir: str, defining: tuple[str, ...]):
  """A workdir is one run: refuse a config that defines a different run, and say where."""
  if os.path.exists(workdir):
    check(os.path.isdir(workdir), f'workdir {workdir} exists and is not a directory')
  diffs = [
    f'{k}: workdir has {old!r}, config has {new!r}'
    for k, old, new in changes(config, workdir, defining)
  ]
  if diffs:
    raise ConfigError(
      f'workdir {workdir} holds a run with a different config; use a new workdir, or match it: '
      + '; '.join(diffs)
    )


def changes(config: ml_collections.ConfigDict, workdir: str, fields: tuple[str, ...] | None = None):
  """(key, the run's value, config's value) for the fields (all when None) where the workdir's
  config.json and `config` differ. A key the saved config lacks is a field added to the code
  since the run began: its default does not count as a change."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    saved = json.load(f)
  new = json.loads(config.to_json())
  return [
    diff
    for field in (fields or sorted(saved))
    for diff in _diff(field, saved.get(field), new.get(field))
  ]


def _diff(prefix, saved, new):
  if isinstance(saved, dict) and isinstance(new, dict):
    for k in sorted(set(saved) | set(new)):
      if k in saved:
        yield from _diff(f'{prefix}.{k}', saved[k], new.get(k))
  elif saved != new:
    yield prefix, saved, new


def check_fresh_start(workdir: str, moved_aside: list[str], allow_restart: bool) -> bool:
  """Whether a run that found no checkpoint to resume from is a restart over an earlier run's
  history; raises RunError if it is and the user has not allowed it.

  A run killed before its first checkpoint leaves metrics that no checkpoint could back yet,
  and starts again freely; a run whose checkpoints were all lost (moved aside as unreadable,
  or the checkpoints folder removed) or that finished (final.json) does not.
  """
  logged = writers.read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  lost = []
  if moved_aside:
    lost.append(f'checkpoints moved aside as unreadable ({", ".join(moved_aside)})')
  if logged and not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    lost.append(f'metrics.jsonl up to step {logged[-1]["step"]} but no checkpoints folder')
  if os.path.exists(os.path.join(workdir, 'final.json')):
    lost.append('final.json of a finished run')
  if not lost:
    return False
  if not allow_restart:
    raise RunError(
      f'workdir {workdir} holds a run with no checkpoint to resume from: '
      + '; '.join(lost)
      + '. Refusing to start it again from step 0 over its history. Put the checkpoints back, '
      'use a new workdir, or pass --allow_restart to start again (the old metrics, samples, '
      'TensorBoard events and unreadable checkpoints are first moved into a previous.TIME '
      'folder of the workdir)'
    )
  return True


def prepare(workdir: str, config: ml_collections.ConfigDict, tokenizer, restart: bool) -> None:
  """Creates the workdir and proves it writable; records the run (config, tokenizer); a
  restart first moves the history it replaces aside. Called once every check has passed."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{jax.process_index()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f'workdir {workdir} is not writable: {e}') from e
  if jax.process_index() == 0:
    if restart:
      previous = os.path.join(workdir, f'previous.{time.strftime("%Y%m%d-%H%M%S")}')
      os.makedirs(previous)
      for name in HISTORY:
        if os.path.exists(os.path.join(workdir, name)):
          os.rename(os.path.join(workdir, name), os.path.join(previous, name))
      checkpoints = os.path.join(workdir, 'checkpoints')
      for name in os.listdir(checkpoints) if os.path.isdir(checkpoints) else []:
        if checkpoint.UNREADABLE in name:  # kept, out of the way of the new run's checks
          os.renames(os.path.join(checkpoints, name), os.path.join(previous, 'checkpoints', name))
      log.warning('restarting from step 0: the earlier history was moved to %s', previous)
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))
    tokenizer.save(os.path.join(workdir, 'tokenizer.json'))
    # The folder's presence says that checkpoints were expected here (check_fresh_start).
    os.makedirs(os.path.join(workdir, 'checkpoints'), exist_ok=True)
  log.info(
    'workdir %s: config.json, tokenizer.json, checkpoints/ (every %d steps), metrics.jsonl '
    'and tensorboard/ (every %d steps), samples.txt, and final.json when it finishes',
    os.path.abspath(workdir),
    config.checkpoint_every_steps,
    config.log_every_steps,
  )
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('ar_jax_workdir_prepared')


def unfinished(workdir: str) -> None:
  """Training is about to change the run: it is no longer the one final.json describes."""
  path = os.path.join(workdir, 'final.json')
  if jax.process_index() == 0 and os.path.exists(path):
    os.remove(path)


def write_final(workdir: str, summary: dict[str, Any]) -> None:
  """final.json: the finished run's numbers, for studies. Written last, atomically: its
  presence means the run is complete (sweeps skip such runs)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'final.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(summary, f, indent=2)
  os.replace(path + '.tmp', path)
  where = os.path.abspath(workdir)
  log.info(
    'results in %s: final.json (the final metrics), metrics.jsonl, samples.txt; curves with '
    'tensorboard --logdir=%s',
    where,
    os.path.join(where, 'tensorboard'),
  )


def restore(ckpt: checkpoint.Checkpointer, abstract, config, workdir: str, reader: bool):
  """ckpt.restore_latest: of the whole state by a trainer, which moves damaged steps aside;
  of the parameters alone by a reader, which moves nothing. A mismatch names the fields this
  config changed from the run's."""
  try:
    return ckpt.restore_latest(abstract, move_aside=not reader, params_only=reader)
  except checkpoint.Mismatch as e:
    changed = [f'{k} ({old!r} -> {new!r})' for k, old, new in changes(config, workdir)]
    if not changed:
      raise
    raise checkpoint.Mismatch(
      f"{e}. This config differs from the run's config.json in: {', '.join(changed)}"
    ) from e


def read_params(workdir: str, abstract_params: Any, config) -> tuple[int, Any]:
  """(step, parameters) of the newest readable checkpoint, for a reader: damaged steps are
  skipped with a warning and left where they are."""
  with checkpoint.Checkpointer(workdir, reader=True) as ckpt:
    restored = restore(ckpt, abstract_params, config, workdir, reader=True)
    steps = ckpt.steps()
  if restored is None:
    raise RunError(
      f'workdir {workdir} has no readable checkpoint'
      + (f' (steps {steps} are damaged)' if steps else ' yet')
    )
  return restored[0], restored[1]


def load(workdir: str):
  """(model, params, tokenizer, step) from a workdir's config, tokenizer and latest readable
  checkpoint: the parameters alone, split over every local device by the run's rules (fsdp
  over all of them), whatever mesh the run trained on, so that no device holds them whole."""
  config_path = os.path.join(workdir, 'config.json')
  check(os.path.exists(config_path), f'{workdir} is not a run directory: it has no config.json')
  with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  tokenizer = tokenizers.load(os.path.join(workdir, 'tokenizer.json'))
  model = models.get_model(config.model, tokenizer.vocab_size, tokenizer.eos_id)
  tx = optim.make_optimizer(
    config.optim, config.num_train_steps, models.capabilities(config.model.name).no_decay
  )
  mesh = sharding.make_mesh({'data': 1, 'fsdp': -1, 'tensor': 1})
  abstract, _ = state.abstract_state(model, tx, mesh, config)
  step, params = read_params(workdir, abstract.params, config)
  return model, params, tokenizer, step
