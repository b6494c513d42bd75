"""Training and evaluation: pure jitted steps, and the loop that runs them for a workdir."""

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ar_jax import decode, evaluation, finite, objectives, preemption
from ar_jax import run as run_lib
from ar_jax import state as state_lib
from ar_jax import workdir as workdir_lib
from ar_jax.data import batches
from ar_jax.errors import ConfigError
from ar_jax.monitor import profiling, progress, writers
from ar_jax.parallel import sharding
from ar_jax.workdir import checkpoint, lock

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO


def train_step(
  state: state_lib.TrainState,
  batch_BT: jax.Array,
  *,
  objective: objectives.Objective,
  tx,
  seed: int,
  skip_nonfinite: bool,
  accum_steps: int,
  cache_batch_axis: int,
):
  """One optimizer step on the objective (ar_jax/objectives.py) over the batch, cut into
  accum_steps microbatches whose gradients are averaged before clipping and the update. With
  skip_nonfinite, a step whose loss or gradient is not finite changes nothing."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  grad_fn = jax.value_and_grad(
    lambda params, batch, carry, rng: objective(params, batch, carry, rng, state.step),
    has_aux=True,
  )
  (loss, carry), grads = objectives.accumulate(
    grad_fn, state.params, batch_BT, state.carry, rng, accum_steps, cache_batch_axis
  )
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state_lib.TrainState(
    state.step + 1, optax.apply_updates(state.params, updates), opt_state, carry
  )
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if skip_nonfinite:
    kept = state.replace(step=state.step + 1)
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, kept)
  return new_state, {'loss': loss, 'grad_norm': grad_norm, 'skipped': ~ok}


def train_steps(state: state_lib.TrainState, batches_KBT: jax.Array, **step_kwargs):
  """K train steps in one dispatch: per-call overhead is paid once, not K times."""
  return jax.lax.scan(functools.partial(train_step, **step_kwargs), state, batches_KBT)


def init_state(run: run_lib.Run, shardings: state_lib.TrainState) -> state_lib.TrainState:
  """Parameters created directly in their shards: no device ever holds a full replica."""
  init = state_lib.init_fn(run.model, run.tx, run.config, unbox=True)
  with sharding.context(run.mesh, run.rules):
    return jax.jit(init, out_shardings=shardings)(jax.random.key(run.config.seed))


def checkpoint_meta(run: run_lib.Run) -> dict:
  """What a checkpoint records of its run besides the state: the config and tokenizer."""
  config = json.loads(run.config.to_json())
  return {'config': config, 'tokenizer': dataclasses.asdict(run.tokenizer)}


class Trainer:
  """The compiled train dispatch of one run."""

  def __init__(self, run: run_lib.Run, shardings: state_lib.TrainState):
    self.run = run
    self.stacked_sharding = sharding.batch_sharding(run.mesh, leading_dims=1)
    self.jitted_train = jax.jit(
      functools.partial(
        train_steps,
        objective=objectives.make(run.train_model, run.config, run.packed_eos),
        tx=run.tx,
        seed=run.config.seed,
        skip_nonfinite=run.config.nan_policy == 'skip',
        accum_steps=run.config.grad_accum_steps,
        cache_batch_axis=run.model.cache_batch_axis,
      ),
      in_shardings=(shardings, self.stacked_sharding),
      out_shardings=(shardings, sharding.replicated(run.mesh)),
      donate_argnums=0,
    )
    self.stopwatch = progress.Stopwatch()  # compiles are not training time
    self._compiled: dict[int, Any] = {}

  def train(self, state: state_lib.TrainState, local_batches_KBT: np.ndarray):
    global_KBT = sharding.global_batch(local_batches_KBT, self.stacked_sharding)
    return self.compile(state, global_KBT)(state, global_KBT)

  def compile(self, state: state_lib.TrainState, batches_KBT: Any):
    """The train dispatch for these (concrete or abstract) operands, compiled once per K."""
    k = batches_KBT.shape[0]
    if k not in self._compiled:
      with (
        self.stopwatch.excluded(),
        sharding.context(self.run.mesh, self.run.rules),
      ):
        self._compiled[k] = self.jitted_train.lower(state, batches_KBT).compile()
    return self._compiled[k]

  def abstract_batches(self, k: int) -> jax.ShapeDtypeStruct:
    cfg = self.run.config
    shape = (k, cfg.batch_size, cfg.data.seq_len + 1)
    return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.stacked_sharding)

  def memory(self, state: state_lib.TrainState) -> dict[str, float]:
    """Memory per device of the largest train dispatch compiled (steps_per_dispatch steps when
    none was: a run resumed at its end)."""
    k = max(self._compiled, default=self.run.config.steps_per_dispatch)
    return progress.memory_per_device(self.compile(state, self.abstract_batches(k)))


def chunk_sizes(start: int, config: ml_collections.ConfigDict, marks=()) -> list[int]:
  """How many steps each dispatch runs: at most steps_per_dispatch, and never past a step where
  the loop logs, evaluates or saves, or one of `marks` (a profile's first and end steps).
  Resuming from a saved step gives the same chunks as an uninterrupted run from there, so
  its losses are the same bit for bit."""
  every = (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps)
  sizes, step = [], start
  while step < config.num_train_steps:
    after = [m for m in marks if m > step]
    nxt = min([config.num_train_steps, *after] + [(step // e + 1) * e for e in every])
    k = min(config.steps_per_dispatch, nxt - step)
    sizes.append(k)
    step += k
  return sizes


def write_sample(run: run_lib.Run, params: Any, step: int) -> tuple[str, float]:
  """A continuation of config.sample.prompt, printed and appended to samples.txt, and the
  decoding speed in new tokens per second (a second, timed call: the first compiles)."""
  s = run.config.sample
  prompt = run.tokenizer.encode(s.prompt)
  room = (run.model.max_len or math.inf) - len(prompt)
  new_tokens = int(min(s.max_new_tokens, room))
  generate = functools.partial(
    decode.generate,
    run.model,
    params,
    prompt[None, :],
    new_tokens,
    jax.random.key(run.config.seed),
    temperature=s.temperature,
    top_k=s.top_k,
  )
  tokens = jax.block_until_ready(generate().tokens)
  start = time.perf_counter()
  jax.block_until_ready(generate().tokens)
  tokens_per_sec = new_tokens / (time.perf_counter() - start)
  text = run.tokenizer.decode(np.asarray(tokens[0]))
  if jax.process_index() == 0:
    with open(os.path.join(run.workdir, 'samples.txt'), 'a') as f:
      f.write(f'=== step {step}\n{text}\n')
  return text, tokens_per_sec


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, allow_restart: bool = False
) -> dict[str, float]:
  """Trains config's model in workdir, resuming from its latest readable checkpoint.

  Returns the final evaluation metrics. SIGTERM or SIGINT stops it cleanly: the current
  dispatch (or evaluation batch) finishes, a checkpoint is written, and it returns what it
  has. A workdir whose history no checkpoint backs is refused unless allow_restart.
  """
  run = run_lib.setup(config, workdir)
  block, blocks = sharding.process_rows(run.mesh)  # this process reads that block of the rows
  stream = batches.train_iterator(
    run.streams.train,
    batch_size=config.batch_size,
    seq_len=config.data.seq_len,
    seed=config.seed,
    sampling=config.data.sampling,
    process_index=block,
    process_count=blocks,
  )
  _check_prompt(run)
  abstract, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, config)
  with (
    lock.held(workdir) as workdir_lock,  # before anything is written, debris cleaned included
    checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints) as ckpt,
  ):
    restored = workdir_lib.restore(ckpt, abstract, config, workdir, reader=False)
    restart = restored is None and workdir_lib.check_fresh_start(
      workdir, ckpt.moved_aside(), allow_restart
    )
    workdir_lib.prepare(workdir, config, run.tokenizer, restart)  # every check has passed
    eval_pending = False
    if restored is None:
      state = init_state(run, shardings)
    else:
      saved_step, state, data_state, saved_meta = restored
      if data_state:  # an imported checkpoint (ar_jax.convert) has read no data yet
        stream.set_state(data_state)
      eval_pending = saved_meta.get('eval_pending', False)
      log.info('resumed from the checkpoint at step %d', saved_step)
    loop = Loop(run, shardings, state, ckpt, workdir_lock)
    loop.train(stream, eval_pending)
  if not loop.stopped:
    text, sample_speed = write_sample(run, loop.state.params, loop.step)
    log.info('sample at step %d:\n%s', loop.step, text)
    summary = {
      'step': loop.step,
      **loop.final_eval,
      'num_params': loop.meter.num_params,
      'forward_flops_per_token': loop.meter.flops_per_token / 3,
      **loop.trainer.memory(loop.state),
      'sample/tokens_per_sec': sample_speed,
    }
    workdir_lib.write_final(workdir, summary)
  return loop.final_eval


class Loop:
  """A run's training from a state: dispatches of steps, their log, evaluations and
  checkpoints on schedule, and a clean stop at a stop request."""

  def __init__(self, run, shardings, state, ckpt, workdir_lock):
    config, workdir = run.config, run.workdir
    self.run, self.state, self.ckpt, self.workdir_lock = run, state, ckpt, workdir_lock
    self.step = int(state.step)
    if self.step < config.num_train_steps:
      workdir_lib.unfinished(workdir)
    self.meta = checkpoint_meta(run)
    self.trainer = Trainer(run, shardings)
    self.evaluator = evaluation.Evaluator(run, shardings.params)
    self.writer = writers.MetricWriter(workdir, resume_step=self.step, config=config)
    self.trace = profiling.Trace(config, workdir)
    self.meter = progress.Progress(
      run, self.trainer.stopwatch, state_lib.count_params(state.params)
    )
    self.final_eval, self.pending, self.stopped = {}, [], False

  def train(self, stream, eval_pending: bool) -> None:
    config, first_step = self.run.config, self.step
    try:
      with preemption.stop_requests() as self.stop:
        if eval_pending:  # the evaluation at the checkpoint's step was cut short by a stop
          self.stopped = not self._evaluate()
        for k in [] if self.stopped else chunk_sizes(self.step, config, self.trace.marks()):
          self._dispatch(np.stack([next(stream) for _ in range(k)]), stream)
          if self.stopped:
            break
      if self.stopped:
        self.ckpt.wait()  # the checkpoint is on disk before the run says so
        log.warning(
          'stopped by signal %s at step %d: checkpoint saved; start again with the same '
          'workdir to continue',
          self.stop.signal,
          self.step,
        )
      elif self.step == first_step and not self.final_eval:  # nothing to train: where it stands
        self.final_eval = self._finite(self.evaluator.evaluate(self.state.params))
    finally:  # on an error too: the metrics are flushed (the Checkpointer closes itself)
      self.trace.finish()
      self.writer.close()

  def _dispatch(self, local_KBT: np.ndarray, stream) -> None:
    """K steps, then what falls due at the step they end on: the log, an evaluation, a
    checkpoint (also on a stop request)."""
    config = self.run.config
    self.trace.before(self.step)
    self.state, step_metrics = self.trainer.train(self.state, local_KBT)
    self.pending.append(step_metrics)
    self.step += len(local_KBT)
    self.trace.after(self.step, self.state)
    at = lambda every: self.step % every == 0 or self.step == config.num_train_steps
    self.ckpt.check()  # a background save that failed stops the run here
    if self.workdir_lock is not None:
      self.workdir_lock.check()  # a lock lost (a long stall on a shared filesystem)
    self.stopped = self.stop.requested()
    if at(config.log_every_steps) or at(config.checkpoint_every_steps) or self.stopped:
      # Nothing reaches a checkpoint or the log before it is known to be finite.
      host = finite.training(
        jax.device_get(self.pending), self.step, config.nan_policy, self.ckpt.latest_step()
      )
    if at(config.log_every_steps):
      self.writer.write(self.step, self.meter.log(self.step, host))
      self.pending = []
    eval_pending = at(config.eval_every_steps) and (self.stopped or not self._evaluate())
    self.stopped = self.stopped or eval_pending
    if at(config.checkpoint_every_steps) or self.stopped:
      meta = {**self.meta, 'eval_pending': eval_pending}
      self.ckpt.save(self.step, self.state, stream.get_state(), meta)

  def _evaluate(self) -> bool:
    """True when it finished, False when a stop request cut it short."""
    result = self.meter.evaluate(self.evaluator, self.state.params, self.step, self.stop.requested)
    if result is not None:
      self.final_eval = self._finite(result)
      self.writer.write(self.step, self.final_eval)
    return result is not None

  def _finite(self, metrics: dict) -> dict:
    config = self.run.config
    return finite.evaluation(metrics, self.step, config.nan_policy, self.ckpt.latest_step())


def _check_prompt(run: run_lib.Run) -> None:
  """The end-of-run sample's prompt must encode: found before training, not after it."""
  try:
    run.tokenizer.encode(run.config.sample.prompt)
  except ConfigError as e:
    raise ConfigError(f'sample.prompt={run.config.sample.prompt!r}: {e}') from e


def compile_only(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Compiles the train step for the configured mesh and reports its memory per device.

  Nothing is trained or written: a configuration that does not fit is caught here, before
  a cluster job spends its allocation finding out.
  """
  run = run_lib.setup(config, workdir, train=False, evaluation=False)
  abstract, shardings = state_lib.abstract_state(run.model, run.tx, run.mesh, config)
  trainer = Trainer(run, shardings)
  memory = trainer.memory(abstract)
  log.info(
    'train step for mesh %s (%d devices): per device %s; about %.2f GiB in all',
    dict(run.mesh.shape),
    run.mesh.size,
    ', '.join(f'{k.split("/")[1]} {v / 2**20:.1f} MiB' for k, v in memory.items()),
    memory['memory/total_bytes'] / 2**30,
  )
  # One program runs on every device, so XLA's figures above are each device's; what differs
  # between pipeline stages is which layers (and their optimizer state) their devices hold.
  for s, devices in enumerate(run.mesh.devices if run.mesh.shape['stage'] > 1 else ()):
    held = sharding.bytes_on(devices.flat[0], abstract)
    memory[f'memory/stage_{s}/params_and_state_bytes'] = float(held)
    log.info('stage %d: parameters and optimizer state %.1f MiB per device', s, held / 2**20)
  return memory
