"""A run assembled from its config: data, model, mesh and optimizer, built and checked
against itself, the devices, the data and the workdir before anything is written."""

import dataclasses
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from ar_jax import data, models, objectives, optim
from ar_jax.data import tokenizers
from ar_jax.errors import check
from ar_jax.monitor import profiling, writers
from ar_jax.parallel import pipeline, sharding
from ar_jax.workdir import history

log = logging.getLogger(__name__)  # ar_jax's own lines: cli.py keeps them at INFO


def validate(config: ml_collections.ConfigDict) -> None:
  """The checks on the shared fields that need nothing but the config."""
  for name in (
    'num_train_steps',
    'batch_size',
    'log_every_steps',
    'eval_every_steps',
    'checkpoint_every_steps',
    'steps_per_dispatch',
    'grad_accum_steps',
    'keep_checkpoints',
  ):
    check(config[name] > 0, f'{name} must be positive, got {config[name]}')
  check(config.data.seq_len > 0, f'data.seq_len must be positive, got {config.data.seq_len}')
  for name in ('eval_batches', 'eval_batch_size'):  # 0 means: all of them, batch_size
    check(config[name] >= 0, f'{name} must be >= 0 (0 = the default), got {config[name]}')
  objectives.validate(config.scheduled_sampling)
  profiling.validate(config.profile)
  check(
    config.wandb.mode in writers.WANDB_MODES,
    f'wandb.mode={config.wandb.mode!r}; allowed: {", ".join(writers.WANDB_MODES)}',
  )
  warmup = optim.warmup_steps(config.optim, config.num_train_steps)
  if warmup != config.optim.warmup_steps:
    log.warning(
      'optim.warmup_steps=%d does not end before the learning-rate decay (%d steps); warming '
      'up over %d steps (a tenth) instead',
      config.optim.warmup_steps,
      config.optim.decay_steps or config.num_train_steps,
      warmup,
    )
  check(
    config.nan_policy in ('stop', 'skip'),
    f'nan_policy={config.nan_policy!r}; allowed: stop, skip',
  )
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
  def tokenizer(self) -> tokenizers.AnyTokenizer:
    return self.streams.tokenizer

  @property
  def packed_eos(self) -> int | None:
    """The token that starts each packed document (data.packing='documents'), else None."""
    return self.tokenizer.eos_id if self.config.data.packing == 'documents' else None

  @property
  def rules(self) -> tuple[tuple[str, Any], ...]:
    """The logical-axis rules that place this run's arrays on its mesh."""
    return models.sharding_rules(self.config)


def setup(
  config: ml_collections.ConfigDict,
  workdir: str,
  defining: tuple[str, ...] = history.RUN_DEFINING,
  *,
  train: bool = True,
  evaluation: bool = True,
) -> Run:
  """Validates config against itself, the devices, the data and the workdir (its `defining`
  fields must match the run's); writes nothing. The training and eval splits are read and
  tokenized only when asked for (compiling needs neither, evaluating no training split)."""
  validate(config)
  history.check_config(config, workdir, defining)
  tokenizer_path = os.path.join(workdir, 'tokenizer.json')
  tokenizer = tokenizers.load(tokenizer_path) if os.path.exists(tokenizer_path) else None
  streams = data.load(config.data, tokenizer, train=train, evaluation=evaluation)
  vocab = streams.tokenizer.vocab_size
  eos = streams.tokenizer.eos_id
  stages = pipeline.from_config(config)
  model = models.get_model(config.model, vocab, eos, pipeline=stages)
  train_model = models.get_model(config.model, vocab, eos, deterministic=False, pipeline=stages)
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
  check(
    config.batch_size % (dp * config.grad_accum_steps) == 0,
    f'batch_size={config.batch_size} does not split into grad_accum_steps='
    f'{config.grad_accum_steps} microbatches over the data-parallel size {dp}',
  )
  rows = {
    'batch_size / grad_accum_steps': config.batch_size // config.grad_accum_steps,
    'eval_batch_size': config.eval_batch_size or config.batch_size,
  }
  for name, n in rows.items() if stages else ():
    check(
      n % (dp * stages.microbatches) == 0,
      f'a batch of {n} rows ({name}) does not split into {stages.microbatches} pipeline '
      f'microbatches over the data-parallel size {dp}',
    )
  tx = optim.make_optimizer(
    config.optim, config.num_train_steps, models.capabilities(config.model.name).no_decay
  )
  return Run(config, workdir, streams, model, train_model, mesh, tx)
