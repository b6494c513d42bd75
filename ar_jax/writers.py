"""Metrics to disk: metrics.jsonl (one JSON object per line) and TensorBoard event files."""

import json
import os
from typing import Any

import jax


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
    if os.path.exists(path):
      with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line)['step'] <= resume_step]
      with open(path + '.tmp', 'w') as f:
        f.writelines(lines)
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
