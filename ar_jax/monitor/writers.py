"""Metrics to disk: metrics.jsonl (one JSON object per line) and TensorBoard event files; and
to Weights & Biases when config.wandb.project names a project."""

import json
import logging
import os
import uuid
from typing import Any

import jax

from ar_jax.errors import ConfigError, RunError

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO
WANDB_MODES = ('online', 'offline', 'disabled')


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The records of a metrics.jsonl ([] when there is none).

  A torn last line (a process killed mid-write) is dropped with a warning; a damaged line
  before it is an error, naming the line.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  records = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if n < len(lines):
        raise RunError(f'{path}, line {n}, is damaged ({e}): {line[:80]!r}') from e
      log.warning('%s: dropped its torn last line %r (a write cut short)', path, line[:80])
  return records


class MetricWriter:
  """Writes from process 0 only; every process may call it.

  A run resumed at `resume_step` first drops the lines metrics.jsonl holds for later steps:
  they came from work lost with the process that wrote them, and are about to be redone.
  """

  def __init__(self, workdir: str, resume_step: int = 0, config=None):
    self._active = jax.process_index() == 0
    self._wandb = None
    if not self._active:
      return
    from tensorboardX import SummaryWriter  # Heavy import; only process 0 needs it.

    path = os.path.join(workdir, 'metrics.jsonl')
    records = read_metrics(path)
    kept = [r for r in records if r['step'] <= resume_step]
    if len(kept) < len(records):
      log.info(
        'metrics.jsonl: %d lines after step %d dropped; their steps are redone from the checkpoint',
        len(records) - len(kept),
        resume_step,
      )
    with open(path + '.tmp', 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in kept)
    os.replace(path + '.tmp', path)
    self._jsonl = open(path, 'a')  # noqa: SIM115 - closed in close()
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    if config is not None and config.wandb.project:
      self._wandb = _wandb_run(workdir, config)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._wandb is not None:
      self._wandb.log(scalars, step=step)

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()
      if self._wandb is not None:
        self._wandb.finish()


def _wandb_run(workdir: str, config):
  """The W&B run of this workdir: its id is kept in WORKDIR/wandb/run_id, so a resumed run
  goes on logging into the same W&B run."""
  try:
    import wandb  # An optional extra: pip install -e '.[wandb]'.
  except ImportError as e:
    raise ConfigError(
      "wandb.project is set but wandb is not installed: pip install -e '.[wandb]'"
    ) from e
  os.makedirs(os.path.join(workdir, 'wandb'), exist_ok=True)
  id_path = os.path.join(workdir, 'wandb', 'run_id')
  if not os.path.exists(id_path):
    with open(id_path, 'w') as f:
      f.write(uuid.uuid4().hex[:12])
  with open(id_path) as f:
    run_id = f.read().strip()
  w = config.wandb
  return wandb.init(
    project=w.project,
    entity=w.entity or None,
    name=w.name or os.path.basename(os.path.abspath(workdir)),
    id=run_id,
    resume='allow',
    mode=w.mode,
    dir=workdir,
    config=json.loads(config.to_json()),
  )
