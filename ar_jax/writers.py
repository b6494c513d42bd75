"""Metrics to disk: metrics.jsonl (one JSON object per line) and TensorBoard event files."""

import json
import logging
import os
from typing import Any

import jax

from ar_jax.errors import RunError

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO


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

  def __init__(self, workdir: str, resume_step: int = 0):
    self._active = jax.process_index() == 0
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

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._active:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._active:
      self._jsonl.close()
      self._tb.close()
