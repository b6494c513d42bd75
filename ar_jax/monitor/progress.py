"""Throughput and memory accounting: the progress log's train/... scalars, training time
measured once (compiles and evaluations excluded), and XLA's memory per device."""

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from ar_jax import optim
from ar_jax.monitor import flops

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO


class Stopwatch:
  """Training time: the wall time since the last lap, less what ran inside excluded()
  (compiles, evaluations). One object, shared by the trainer and the progress log, so each
  excluded second is subtracted once."""

  def __init__(self):
    self._lap, self._excluded = time.perf_counter(), 0.0

  @contextlib.contextmanager
  def excluded(self) -> Iterator[None]:
    start = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - start

  def lap(self) -> float:
    """Training seconds since the last lap, and a new lap begins."""
    now = time.perf_counter()
    seconds = now - self._lap - self._excluded
    self._lap, self._excluded = now, 0.0
    return seconds


class Progress:
  """Turns the steps' metrics into train/... scalars and the progress line with its ETA."""

  def __init__(self, run, stopwatch: Stopwatch, num_params: int):
    """run: the workdir's Run; stopwatch: the one its trainer excludes compiles from."""
    cfg = run.config
    self.run, self.num_params = run, num_params
    self.lr = optim.schedule(cfg.optim, cfg.num_train_steps)
    self.tokens_per_step = cfg.batch_size * cfg.data.seq_len
    self.flops_per_token = 3 * run.model.flops_per_token(cfg.data.seq_len)
    self.peak, peak_source = flops.peak_flops(jax.devices()[0], cfg.model.get('dtype', 'float32'))
    log.info(
      '%s: %.2fM parameters, %.2f MFLOP per token (training), peak %.3g TFLOP/s per device (%s)',
      cfg.model.name,
      num_params / 1e6,
      self.flops_per_token / 1e6,
      self.peak / 1e12,
      peak_source,
    )
    self.stopwatch = stopwatch
    self.stopwatch.lap()  # throughput counts from here

  def log(self, step: int, host: list[dict]) -> dict[str, float]:
    cfg = self.run.config
    losses = np.concatenate([m['loss'] for m in host])
    skipped = np.concatenate([m['skipped'] for m in host])
    seconds = self.stopwatch.lap()  # compiles and evaluations are not throughput
    steps = len(losses)
    tokens_per_sec = steps * self.tokens_per_step / seconds
    per_device = tokens_per_sec / self.run.mesh.size
    logged = {
      'train/loss': float(losses[~skipped].mean()) if (~skipped).any() else math.nan,
      'train/grad_norm': float(np.concatenate([m['grad_norm'] for m in host])[~skipped].mean())
      if (~skipped).any()
      else math.nan,
      'train/learning_rate': float(self.lr(step - 1)),
      'train/tokens_per_sec': tokens_per_sec,
      'train/tokens_per_sec_per_device': per_device,
      'train/step_time_ms': 1000 * seconds / steps,
      'train/mfu': per_device * self.flops_per_token / self.peak,
      'train/tokens_seen': step * self.tokens_per_step,
      'train/skipped_steps': float(skipped.sum()),
    }
    eta = (cfg.num_train_steps - step) * seconds / steps
    log.info(
      'step %d/%d | loss %.4f | %.0f tok/s | mfu %.1f%% | eta %s',
      step,
      cfg.num_train_steps,
      logged['train/loss'],
      tokens_per_sec,
      100 * logged['train/mfu'],
      duration(eta),
    )
    return logged

  def evaluate(self, evaluator, params, step: int, should_stop: Callable[[], bool]) -> dict | None:
    """evaluator.evaluate(params, should_stop), logged, its time not counted as training."""
    # The train steps still in flight count as training time, not evaluation time.
    jax.block_until_ready(params)
    with self.stopwatch.excluded():
      metrics = evaluator.evaluate(params, should_stop)
    if metrics is None:
      log.warning('eval at step %d: abandoned for a stop request', step)
    else:
      log.info('eval at step %d: %s', step, _fmt(metrics))
    return metrics


def memory_per_device(compiled) -> dict[str, float]:
  """XLA's memory accounting of a compiled step, per device, in bytes."""
  m = compiled.memory_analysis()
  per_device = {
    'params_and_state_bytes': m.argument_size_in_bytes,
    'temporaries_bytes': m.temp_size_in_bytes,
    'output_bytes': m.output_size_in_bytes,
    'generated_code_bytes': m.generated_code_size_in_bytes,
  }
  total = sum(per_device.values()) - m.alias_size_in_bytes
  return {
    **{f'memory/{k}': float(v) for k, v in per_device.items()},
    'memory/total_bytes': float(total),
  }


def duration(seconds: float) -> str:
  seconds = int(seconds)
  return (
    f'{seconds // 3600}h{seconds // 60 % 60:02d}m'
    if seconds >= 3600
    else (f'{seconds // 60}m{seconds % 60:02d}s')
  )


def _fmt(d: dict[str, float]) -> str:
  return ', '.join(f'{k.split("/")[-1]} {v:.4f}' for k, v in d.items())
