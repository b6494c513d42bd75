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

from ar_jax import decode, evaluation, finite, preemption, scheduled_sampling
from ar_jax import run as run_lib
from ar_jax import state as state_lib
from ar_jax import workdir as workdir_lib
from ar_jax.data import batches
from ar_jax.errors import ConfigError, check
from ar_jax.monitor import profiling, progress, writers
from ar_jax.parallel import sharding
from ar_jax.workdir import checkpoint, lock

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO


def train_step(
  state: state_lib.TrainState,
  batch_BT: jax.Array,
  *,
  model,
  tx,
  seed: int,
  skip_nonfinite: bool,
  accum_steps: int,
  scheduled: Any = None,
  packed_eos: int | None = None,
):
  """One AdamW step on the mean token cross-entropy under teacher forcing.

  The batch may be cut into accum_steps microbatches whose gradients are averaged before
  clipping and the update (every microbatch has the same token count, so this is the
  token-weighted mean). With a carry in the state, the batch continues each row's stream
  from it; gradients stop at the window boundary (truncated BPTT). With skip_nonfinite, a
  step whose loss or gradient is not finite changes nothing. `scheduled` (the config's
  scheduled_sampling, or None) feeds the model some of its own samples as inputs. With
  packed_eos, windows hold several documents, each starting at that token, and no position
  sees another document's (recurrent models reset their state at it in any case).
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  eps = None if scheduled is None else scheduled_sampling.probability(scheduled, state.step)

  def loss_fn(params, micro_BT, carry, micro_rng):
    dropout_rng, sampling_rng = jax.random.split(micro_rng)

    def apply(tokens_BT, *cache, rng=dropout_rng, **kw):
      return model.apply({'params': params}, tokens_BT, *cache, rngs={'dropout': rng}, **kw)

    inputs_BT = micro_BT[:, :-1]
    # The cached step (recurrent models) resets its state at eos without being told.
    packed = batches.segments(inputs_BT, packed_eos)
    if eps is not None and model.sequential:  # exact, one step at a time
      cache = model.init_cache(*inputs_BT.shape) if carry is None else carry
      step = lambda t_B1, c, t: apply(
        t_B1, jax.lax.stop_gradient(c), rng=jax.random.fold_in(dropout_rng, t), method=model.step
      )
      logits_BTV, cache, _ = scheduled_sampling.step_by_step(
        step, inputs_BT, cache, eps, sampling_rng
      )
      carry = None if carry is None else cache
    elif eps is not None:
      check(carry is None, 'scheduled sampling with a carried state needs a recurrent model')
      two_pass_apply = functools.partial(apply, **packed)
      logits_BTV = scheduled_sampling.two_pass(two_pass_apply, inputs_BT, eps, sampling_rng)
    elif carry is None:
      logits_BTV = apply(inputs_BT, **packed)
    else:
      logits_BTV, carry = apply(inputs_BT, jax.lax.stop_gradient(carry), method=model.step)
    total, count = evaluation.cross_entropy(logits_BTV, micro_BT[:, 1:])
    return total / count, carry

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss, carry), grads = grad_fn(state.params, batch_BT, state.carry, rng)
  else:
    # Row r goes to microbatch r % accum_steps: every device keeps its share of each one.
    split = lambda x, axis=0: jnp.moveaxis(
      x.reshape(*x.shape[:axis], -1, accum_steps, *x.shape[axis + 1 :]), axis + 1, 0
    )
    axis = model.cache_batch_axis
    carries = jax.tree.map(lambda c: split(c, axis) if c.ndim else c, state.carry)

    def micro(grads_sum, inputs):
      micro_BT, carry, i = inputs
      (loss, carry), grads = grad_fn(state.params, micro_BT, carry, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, grads_sum, grads), (loss, carry)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (losses, carries) = jax.lax.scan(
      micro, zeros, (split(batch_BT), carries, jnp.arange(accum_steps))
    )
    grads = jax.tree.map(lambda g: g / accum_steps, grads)
    loss = losses.mean()
    merge = lambda c: jnp.moveaxis(c, 0, axis + 1).reshape(
      *c.shape[1 : axis + 1], -1, *c.shape[axis + 2 :]
    )
    carry = jax.tree.map(lambda c: merge(c) if c.ndim > 1 else c[0], carries)
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
        model=run.train_model,
        tx=run.tx,
        seed=run.config.seed,
        skip_nonfinite=run.config.nan_policy == 'skip',
        accum_steps=run.config.grad_accum_steps,
        scheduled=None
        if run.config.scheduled_sampling.schedule == 'none'
        else run.config.scheduled_sampling,
        packed_eos=run.packed_eos,
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
    step = first_step = int(state.step)
    if step < config.num_train_steps:
      workdir_lib.unfinished(workdir)
    meta = checkpoint_meta(run)
    trainer = Trainer(run, shardings)
    evaluator = evaluation.Evaluator(run, shardings.params)
    writer = writers.MetricWriter(workdir, resume_step=step, config=config)
    trace = profiling.Trace(config, workdir)
    meter = progress.Progress(run, trainer.stopwatch, state_lib.count_params(state.params))

    final_eval, pending, stopped = {}, [], False
    try:
      with preemption.stop_requests() as stop:

        def evaluate():  # True when it finished, False when a stop request cut it short
          nonlocal final_eval
          result = meter.evaluate(evaluator, state.params, step, stop.requested)
          if result is not None:
            final_eval = finite.evaluation(result, step, config.nan_policy, ckpt.latest_step())
            writer.write(step, final_eval)
          return result is not None

        if eval_pending:  # the evaluation at the checkpoint's step was cut short by a stop
          stopped = not evaluate()
        for k in [] if stopped else chunk_sizes(step, config, trace.marks()):
          local = np.stack([next(stream) for _ in range(k)])
          trace.before(step)
          state, step_metrics = trainer.train(state, local)
          pending.append(step_metrics)
          step += k
          trace.after(step, state)
          at = lambda every: step % every == 0 or step == config.num_train_steps  # noqa: B023
          ckpt.check()  # a background save that failed stops the run here
          if workdir_lock is not None:
            workdir_lock.check()  # a lock lost (a long stall on a shared filesystem)
          stopped = stop.requested()
          if at(config.log_every_steps) or at(config.checkpoint_every_steps) or stopped:
            # Nothing reaches a checkpoint or the log before it is known to be finite.
            host = finite.training(
              jax.device_get(pending), step, config.nan_policy, ckpt.latest_step()
            )
          if at(config.log_every_steps):
            writer.write(step, meter.log(step, host))
            pending = []
          eval_pending = at(config.eval_every_steps) and (stopped or not evaluate())
          stopped = stopped or eval_pending
          if at(config.checkpoint_every_steps) or stopped:
            ckpt.save(step, state, stream.get_state(), {**meta, 'eval_pending': eval_pending})
          if stopped:
            break
      if stopped:
        ckpt.wait()  # the checkpoint is on disk before the run says so
        log.warning(
          'stopped by signal %s at step %d: checkpoint saved; start again with the same '
          'workdir to continue',
          stop.signal,
          step,
        )
      elif step == first_step and not final_eval:  # nothing left to train: where it stands
        final_eval = finite.evaluation(
          evaluator.evaluate(state.params), step, config.nan_policy, ckpt.latest_step()
        )
    finally:  # on an error too: the metrics are flushed (the Checkpointer closes itself)
      trace.finish()
      writer.close()
  if not stopped:
    text, sample_speed = write_sample(run, state.params, step)
    log.info('sample at step %d:\n%s', step, text)
    summary = {
      'step': step,
      **final_eval,
      'num_params': meter.num_params,
      'forward_flops_per_token': meter.flops_per_token / 3,
      **trainer.memory(state),
      'sample/tokens_per_sec': sample_speed,
    }
    workdir_lib.write_final(workdir, summary)
  return final_eval


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
