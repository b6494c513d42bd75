"""Training and evaluation: pure jitted steps, and the loop that runs them for a workdir."""

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ar_jax import checkpoint, data, decoding, flops, metrics, models, optim, sharding, writers
from ar_jax.data import pipeline, tokenizers
from ar_jax.errors import ConfigError, check

# Fields that define what a workdir's checkpoints are: a different value cannot resume it.
RUN_DEFINING = ('model', 'data', 'seed', 'batch_size')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # Stateful (truncated-BPTT) training: the model's cache after the last batch, the initial
  # state of the next one. None otherwise.
  carry: Any = None


def cross_entropy(logits_BTV, targets_BT, weights_BT=None):
  """(sum of token losses, sum of weights); the loss is float32 whatever the logits were."""
  losses_BT = optax.softmax_cross_entropy_with_integer_labels(
    logits_BTV.astype(jnp.float32), targets_BT
  )
  if weights_BT is None:
    weights_BT = jnp.ones_like(losses_BT)
  return jnp.sum(losses_BT * weights_BT), jnp.sum(weights_BT)


def train_step(state: TrainState, batch_BT: jax.Array, *, model, tx, seed: int):
  """One AdamW step on the mean token cross-entropy under teacher forcing.

  With a carry in the state, the batch continues each row's stream from it; gradients stop
  at the window boundary (truncated BPTT).
  """
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  inputs_BT, apply = batch_BT[:, :-1], functools.partial(model.apply, rngs={'dropout': rng})

  def loss_fn(params):
    if state.carry is None:
      logits_BTV, carry = apply({'params': params}, inputs_BT), None
    else:
      carry = jax.lax.stop_gradient(state.carry)
      logits_BTV, carry = apply({'params': params}, inputs_BT, carry, method=model.step)
    total, count = cross_entropy(logits_BTV, batch_BT[:, 1:])
    return total / count, carry

  (loss, carry), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = TrainState(state.step + 1, params, opt_state, carry)
  return new_state, {'loss': loss, 'grad_norm': optax.tree.norm(grads)}


def train_steps(state: TrainState, batches_KBT: jax.Array, **step_kwargs):
  """K train steps in one dispatch: per-call overhead is paid once, not K times."""
  return jax.lax.scan(functools.partial(train_step, **step_kwargs), state, batches_KBT)


def eval_step(params, batch_BT, weights_BT, token_bytes_V, *, model):
  """Sums over a batch: negative log-likelihood (nats), predicted tokens, and their bytes."""
  logits_BTV = model.apply({'params': params}, batch_BT[:, :-1])
  nats, tokens = cross_entropy(logits_BTV, batch_BT[:, 1:], weights_BT)
  nbytes = jnp.sum(token_bytes_V[batch_BT[:, 1:]] * weights_BT)
  return {'nats': nats, 'tokens': tokens, 'bytes': nbytes}


def validate(config: ml_collections.ConfigDict) -> None:
  """The checks on the shared fields that need nothing but the config."""
  for name in (
    'num_train_steps',
    'batch_size',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'steps_per_dispatch',
    'keep_checkpoints',
  ):
    check(config[name] > 0, f'{name} must be positive, got {config[name]}')
  check(config.data.seq_len > 0, f'data.seq_len must be positive, got {config.data.seq_len}')
  check(
    not config.stateful or config.data.sampling == 'sequential',
    "stateful training continues each batch row's stream: it needs data.sampling='sequential'",
  )


@dataclasses.dataclass
class Run:
  """Everything a workdir's run is made of, built and checked before anything is written."""

  config: ml_collections.ConfigDict
  workdir: str
  streams: data.TokenStreams
  model: nn.Module  # deterministic: evaluation and sampling
  train_model: nn.Module  # with dropout when the config has it
  mesh: jax.sharding.Mesh
  tx: optax.GradientTransformation

  @property
  def tokenizer(self) -> tokenizers.Tokenizer:
    return self.streams.tokenizer


def setup(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Validates config against itself, the devices, the data and the workdir; writes nothing."""
  validate(config)
  _check_workdir(config, workdir)
  tokenizer_path = os.path.join(workdir, 'tokenizer.json')
  tokenizer = tokenizers.load(tokenizer_path) if os.path.exists(tokenizer_path) else None
  streams = data.load(config.data, tokenizer)
  vocab = streams.tokenizer.vocab_size
  eos = streams.tokenizer.eos_id
  model = models.get_model(config.model, vocab, eos)
  train_model = models.get_model(config.model, vocab, eos, deterministic=False)
  check(
    not config.stateful or not model.max_len,
    f'stateful training carries a recurrent state; model.name={config.model.name!r} has a '
    f'context of {model.max_len} positions instead',
  )
  check(
    not model.max_len or config.data.seq_len <= model.max_len,
    f'data.seq_len={config.data.seq_len} is longer than the {model.max_len} positions the model '
    'supports (model.max_len)',
  )
  mesh = sharding.make_mesh(config.mesh)
  dp = sharding.data_parallel_size(mesh)
  check(
    config.batch_size % dp == 0,
    f'batch_size={config.batch_size} is not divisible by the data-parallel size {dp} '
    f'(mesh data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]})',
  )
  tx = optim.make_optimizer(config.optim, config.num_train_steps)
  return Run(config, workdir, streams, model, train_model, mesh, tx)


def _check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir is one run: refuse a config that defines a different run, and say where."""
  path = os.path.join(workdir, 'config.json')
  if os.path.exists(workdir):
    check(os.path.isdir(workdir), f'workdir {workdir} exists and is not a directory')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  new = json.loads(config.to_json())
  diffs = [
    f'{key}: workdir has {old!r}, config has {now!r}'
    for field in RUN_DEFINING
    for key, old, now in _diff(field, saved.get(field), new.get(field))
  ]
  if diffs:
    raise ConfigError(
      f'workdir {workdir} holds a run with a different config; use a new workdir, or match it: '
      + '; '.join(diffs)
    )


def _diff(prefix, a, b):
  if isinstance(a, dict) and isinstance(b, dict):
    for k in sorted(set(a) | set(b)):
      yield from _diff(f'{prefix}.{k}', a.get(k), b.get(k))
  elif a != b:
    yield prefix, a, b


def _init_fn(model, tx, config: ml_collections.ConfigDict, unbox: bool):
  dummy = jnp.zeros((1, min(config.data.seq_len, 8)), jnp.int32)

  def init(rng):
    params = model.init(rng, dummy)['params']
    params = nn.unbox(params) if unbox else params
    carry = model.init_cache(config.batch_size, config.data.seq_len) if config.stateful else None
    return TrainState(jnp.array(0, jnp.int32), params, tx.init(params), carry)

  return init


def abstract_state(
  model: nn.Module, tx, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict
) -> tuple[TrainState, TrainState]:
  """(shape-only state carrying its shardings, the shardings), materialising nothing."""
  boxed = jax.eval_shape(_init_fn(model, tx, config, unbox=False), jax.random.key(0))
  shardings = sharding.logical_shardings(boxed, mesh, config.sharding_rules)
  if config.stateful:  # the carry's rows follow the batch's
    by_batch = sharding.batch_sharding(mesh, leading_dims=model.cache_batch_axis)
    shardings = shardings.replace(
      carry=jax.tree.map(lambda x: by_batch if x.ndim else sharding.replicated(mesh), boxed.carry)
    )
  abstract = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(boxed), shardings
  )
  return abstract, shardings


def init_state(run: Run, shardings: TrainState) -> TrainState:
  """Parameters created directly in their shards: no device ever holds a full replica."""
  init = _init_fn(run.model, run.tx, run.config, unbox=True)
  with sharding.context(run.mesh, run.config.sharding_rules):
    return jax.jit(init, out_shardings=shardings)(jax.random.key(run.config.seed))


def count_params(params: Any) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))


class Trainer:
  """The compiled steps of one run, and evaluation over its eval splits."""

  def __init__(self, run: Run, shardings: TrainState):
    self.run = run
    self.batch_sharding = sharding.batch_sharding(run.mesh)
    self._stacked_sharding = sharding.batch_sharding(run.mesh, leading_dims=1)
    self._train = jax.jit(
      functools.partial(train_steps, model=run.train_model, tx=run.tx, seed=run.config.seed),
      in_shardings=(shardings, self._stacked_sharding),
      out_shardings=(shardings, sharding.replicated(run.mesh)),
      donate_argnums=0,
    )
    self._eval = jax.jit(
      functools.partial(eval_step, model=run.model),
      in_shardings=(shardings.params, self.batch_sharding, self.batch_sharding, None),
      out_shardings=sharding.replicated(run.mesh),
    )
    self._token_bytes = jnp.asarray(run.tokenizer.token_bytes)
    self.compile_seconds = 0.0
    self._compiled: dict[int, Any] = {}

  def train(self, state: TrainState, local_batches_KBT: np.ndarray):
    k = local_batches_KBT.shape[0]
    batches = sharding.global_batch(local_batches_KBT, self._stacked_sharding)
    if k not in self._compiled:
      start = time.perf_counter()
      with sharding.context(self.run.mesh, self.run.config.sharding_rules):
        self._compiled[k] = self._train.lower(state, batches).compile()
      self.compile_seconds += time.perf_counter() - start
    return self._compiled[k](state, batches)

  def evaluate(self, params) -> dict[str, float]:
    cfg = self.run.config
    sums = []
    with sharding.context(self.run.mesh, cfg.sharding_rules):
      for tokens in self.run.streams.eval.values():
        for batch, weights in pipeline.eval_batches(
          tokens,
          batch_size=cfg.eval_batch_size or cfg.batch_size,
          seq_len=cfg.data.seq_len,
          max_batches=cfg.eval_batches,
          process_index=jax.process_index(),
          process_count=jax.process_count(),
        ):
          sums.append(
            self._eval(
              params,
              sharding.global_batch(batch, self.batch_sharding),
              sharding.global_batch(weights, self.batch_sharding),
              self._token_bytes,
            )
          )
    # One transfer at the end keeps the batches in flight; float64 for the totals.
    totals = {
      k: float(np.sum(v, dtype=np.float64))
      for k, v in jax.tree.map(lambda *xs: np.stack(xs), *jax.device_get(sums)).items()
    }
    loss = totals['nats'] / totals['tokens']
    out = {
      'eval/loss': loss,
      'eval/perplexity': metrics.perplexity(loss),
      'eval/bits_per_byte': metrics.bits_per_unit(totals['nats'], totals['bytes']),
      'eval/tokens': totals['tokens'],
    }
    if self.run.tokenizer.kind == 'char':
      out['eval/bits_per_char'] = metrics.bits_per_unit(totals['nats'], totals['tokens'])
    return out


def chunk_sizes(start: int, config: ml_collections.ConfigDict) -> list[int]:
  """How many steps each dispatch runs: at most steps_per_dispatch, and never past a step where
  the loop logs, evaluates or saves. Resuming from a saved step gives the same chunks as an
  uninterrupted run from there, so its losses are the same bit for bit."""
  every = (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps)
  sizes, step = [], start
  while step < config.num_train_steps:
    nxt = min([config.num_train_steps] + [(step // e + 1) * e for e in every])
    k = min(config.steps_per_dispatch, nxt - step)
    sizes.append(k)
    step += k
  return sizes


def write_sample(run: Run, params: Any, step: int) -> str:
  """A continuation of config.sample.prompt, printed and appended to samples.txt."""
  s = run.config.sample
  prompt = run.tokenizer.encode(s.prompt)
  room = (run.model.max_len or math.inf) - len(prompt)
  tokens = decoding.generate(
    run.model,
    params,
    prompt[None, :],
    int(min(s.max_new_tokens, room)),
    jax.random.key(run.config.seed),
    temperature=s.temperature,
    top_k=s.top_k,
  ).tokens
  text = run.tokenizer.decode(np.asarray(tokens[0]))
  if jax.process_index() == 0:
    with open(os.path.join(run.workdir, 'samples.txt'), 'a') as f:
      f.write(f'=== step {step}\n{text}\n')
  return text


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains config's model in workdir, resuming from its latest checkpoint if it has one.

  Returns the final evaluation metrics.
  """
  run = setup(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  check(os.access(workdir, os.W_OK), f'workdir {workdir} is not writable')
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json(indent=2))
    run.tokenizer.save(os.path.join(workdir, 'tokenizer.json'))

  abstract, shardings = abstract_state(run.model, run.tx, run.mesh, config)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  batches = pipeline.train_iterator(
    run.streams.train,
    batch_size=config.batch_size,
    seq_len=config.data.seq_len,
    seed=config.seed,
    sampling=config.data.sampling,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  latest = ckpt.latest_step()
  if latest is None:
    state = init_state(run, shardings)
  else:
    state, data_state, _ = ckpt.restore(latest, abstract)
    batches.set_state(data_state)
    logging.info('resumed from the checkpoint at step %d', latest)
  step = int(state.step)
  meta = {'config': json.loads(config.to_json()), 'tokenizer': dataclasses.asdict(run.tokenizer)}

  trainer = Trainer(run, shardings)
  writer = writers.MetricWriter(workdir)
  lr_schedule = optim.schedule(config.optim, config.num_train_steps)
  num_params = count_params(state.params)
  tokens_per_step = config.batch_size * config.data.seq_len
  train_flops_per_token = 3 * run.model.flops_per_token(config.data.seq_len)
  peak, peak_source = flops.peak_flops(jax.devices()[0])
  logging.info(
    '%s: %.2fM parameters, %.2f MFLOP per token (training), peak %.1f TFLOP/s per device (%s)',
    config.model.name,
    num_params / 1e6,
    train_flops_per_token / 1e6,
    peak / 1e12,
    peak_source,
  )

  pending, since_log, last_log, first_step = [], 0, time.perf_counter(), step
  compile_at_log = trainer.compile_seconds
  final_eval = {}
  for k in chunk_sizes(step, config):
    local = np.stack([next(batches) for _ in range(k)])
    state, step_metrics = trainer.train(state, local)
    pending.append(step_metrics)
    step += k
    since_log += k
    if step % config.log_every_steps == 0 or step == config.num_train_steps:
      host = jax.device_get(pending)
      losses = np.concatenate([m['loss'] for m in host])
      check_finite(losses, step - since_log, step)
      now = time.perf_counter()
      seconds = now - last_log - (trainer.compile_seconds - compile_at_log)
      tokens_per_sec = since_log * tokens_per_step / seconds
      per_device = tokens_per_sec / run.mesh.size
      logged = {
        'train/loss': float(losses.mean()),
        'train/grad_norm': float(np.concatenate([m['grad_norm'] for m in host]).mean()),
        'train/learning_rate': float(lr_schedule(step - 1)),
        'train/tokens_per_sec': tokens_per_sec,
        'train/tokens_per_sec_per_device': per_device,
        'train/step_time_ms': 1000 * seconds / since_log,
        'train/mfu': per_device * train_flops_per_token / peak,
        'train/tokens_seen': step * tokens_per_step,
      }
      writer.write(step, logged)
      eta = (config.num_train_steps - step) * seconds / since_log
      logging.info(
        'step %d/%d | loss %.4f | %.0f tok/s | mfu %.1f%% | eta %s',
        step,
        config.num_train_steps,
        logged['train/loss'],
        tokens_per_sec,
        100 * logged['train/mfu'],
        _duration(eta),
      )
      pending, since_log, last_log = [], 0, now
      compile_at_log = trainer.compile_seconds
    if step % config.eval_every_steps == 0 or step == config.num_train_steps:
      eval_start = time.perf_counter()
      final_eval = trainer.evaluate(state.params)
      writer.write(step, final_eval)
      logging.info('eval at step %d: %s', step, _fmt(final_eval))
      last_log += time.perf_counter() - eval_start  # throughput counts training time only
    if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
      ckpt.save(step, state, batches.get_state(), meta)

  if step == first_step and not final_eval:  # nothing left to train: report where the run stands
    final_eval = trainer.evaluate(state.params)
  ckpt.wait()
  ckpt.close()
  writer.close()
  sample = write_sample(run, state.params, step)
  logging.info('sample at step %d:\n%s', step, sample)
  return final_eval


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Evaluates the latest checkpoint of workdir on config's eval splits."""
  check(
    os.path.isdir(os.path.join(workdir, 'checkpoints')), f'workdir {workdir} has no checkpoints'
  )
  run = setup(config, workdir)
  abstract, shardings = abstract_state(run.model, run.tx, run.mesh, config)
  ckpt = checkpoint.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
  latest = ckpt.latest_step()
  check(latest is not None, f'workdir {workdir} has no checkpoint to evaluate')
  state, _, _ = ckpt.restore(latest, abstract)
  ckpt.close()
  return {'step': float(latest), **Trainer(run, shardings).evaluate(state.params)}


def check_finite(losses: np.ndarray, first: int, last: int) -> None:
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    raise FloatingPointError(
      f'non-finite training loss {losses[bad[0]]} at step {first + int(bad[0]) + 1} '
      f'(steps {first + 1}..{last}); the checkpoints in the workdir are from before it'
    )


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return (
    f'{seconds // 3600}h{seconds // 60 % 60:02d}m'
    if seconds >= 3600
    else (f'{seconds // 60}m{seconds % 60:02d}s')
  )


def _fmt(d: dict[str, float]) -> str:
  return ', '.join(f'{k.split("/")[-1]} {v:.4f}' for k, v in d.items())
