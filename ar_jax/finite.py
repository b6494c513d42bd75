"""nan_policy: what a non-finite loss or gradient does to a run. 'stop' ends it with a message
naming the step (every checkpoint on disk predates it); 'skip' lets it go on."""

import logging
import math

import numpy as np

from ar_jax.errors import RunError

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO


def evaluation(metrics: dict, step: int, policy: str, last_checkpoint: int | None) -> dict:
  """An evaluation's metrics; a non-finite loss stops the run before anything is written,
  unless nan_policy='skip' (the run goes on, and its evaluations say what they measure)."""
  if math.isfinite(metrics['eval/loss']):
    return metrics
  message = f'non-finite evaluation loss ({metrics["eval/loss"]}) at step {step}'
  if policy == 'skip':
    log.warning('%s (nan_policy=skip: the run goes on)', message)
    return metrics
  raise RunError(f'{message}; {_last(last_checkpoint)}')


def _last(step: int | None) -> str:
  if step is None:
    return 'no checkpoint was written before it'
  return f'the last checkpoint, step {step}, predates it'


def training(host: list[dict], step: int, policy: str, last_checkpoint: int | None) -> list[dict]:
  """The steps' metrics since the last log; raises on a non-finite loss unless skipping."""
  losses = np.concatenate([m['loss'] for m in host])
  grads = np.concatenate([m['grad_norm'] for m in host])
  bad = np.flatnonzero(~(np.isfinite(losses) & np.isfinite(grads)))
  if bad.size and policy == 'stop':
    at = step - len(losses) + int(bad[0]) + 1
    raise RunError(
      f'non-finite training loss ({losses[bad[0]]}) or gradient norm ({grads[bad[0]]}) at step '
      f'{at}, on training batch {at - 1} (counting from 0; a rerun of this config reads the '
      f'same batch); {_last(last_checkpoint)}. Lower the learning rate, or set '
      "nan_policy='skip' to drop such steps"
    )
  return host
