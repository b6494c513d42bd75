"""Model families by module name: config.model.name = 'transformer' is
ar_jax/models/families/transformer.py, and a dotted name ('my_package.my_family') is a family
module anywhere on the path. What a family module defines, and every member of its Model
the rest of the package reads, is the contract in ar_jax/models/contract.py; the pieces the
families share (the layer stack, layers, scans) live beside it, in ar_jax/models.
"""

import dataclasses
import functools
import importlib
import math
import pkgutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ar_jax.errors import ConfigError
from ar_jax.models import contract, families
from ar_jax.parallel import sharding

DATA_DECIDED = frozenset({'vocab_size', 'eos_id'})  # set from the tokenizer, not the config
RUN_DECIDED = frozenset({'pipeline'})  # set from the run's mesh (ar_jax/models/stack.py)


def available() -> list[str]:
  """The families ar_jax ships (ar_jax/models/families/)."""
  return sorted(m.name for m in pkgutil.iter_modules(families.__path__))


def default_config(name: str) -> ml_collections.ConfigDict:
  """config.model for model `name`: its Config's fields and defaults (documented there)."""
  module = _module(name)
  fields = {
    f.name: f.default
    for f in dataclasses.fields(module.Config)
    if f.name not in DATA_DECIDED | RUN_DECIDED
  }
  return ml_collections.ConfigDict({'name': name, **fields})


def capabilities(name: str) -> contract.Capabilities:
  """What family `name` declares of itself beside its Model (contract.Capabilities)."""
  return _module(name).CAPABILITIES


@functools.cache  # the directory listing and the contract check, once per family
def _module(name: str):
  if '.' in name:  # a family module of one's own, by its import path
    try:
      module = importlib.import_module(name)
    except ImportError as e:
      raise ConfigError(f'model.name={name!r}: no such module ({e})') from e
  elif name in available():
    module = importlib.import_module(f'{families.__name__}.{name}')
  else:
    raise ConfigError(f'unknown model.name={name!r}; available: {", ".join(available())}')
  contract.check_family(module)
  return module


def tiny_configs(name: str) -> dict[str, ml_collections.ConfigDict]:
  """The family's TINY variants as config.model dicts, by variant name."""
  module = _module(name)
  return {
    variant: ml_collections.ConfigDict({**default_config(name), **fields})
    for variant, fields in module.TINY.items()
  }


def sharding_rules(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The logical-axis rules of a run: config.sharding_rules (overrides, empty by default),
  then the model family's RULES, then the rules every family shares."""
  return sharding.rules(config.sharding_rules, _module(config.model.name).RULES)


def build_config(model_config: Any, vocab_size: int, eos_id: int | None = None, pipeline=None):
  """The model module's own Config dataclass from the experiment's config.model, plus the
  fields the data decides (vocab_size, and eos_id where the Config has that field) and the
  run's pipeline stages (ar_jax.parallel.pipeline.Pipeline, or None)."""
  name = model_config.name
  module = _module(name)
  known = {f.name for f in dataclasses.fields(module.Config)}
  fields = known - DATA_DECIDED - RUN_DECIDED
  given = {k: v for k, v in model_config.items() if k != 'name'}
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ConfigError(
      f'model {name!r} has no field(s) {", ".join(unknown)}; '
      f'its fields: {", ".join(sorted(fields))}'
    )
  decided = {'vocab_size': vocab_size, 'eos_id': eos_id, 'pipeline': pipeline}
  return module, module.Config(**{k: v for k, v in decided.items() if k in known}, **given)


def get_model(
  model_config: Any,
  vocab_size: int,
  eos_id: int | None = None,
  *,
  deterministic: bool = True,
  pipeline: Any = None,
):
  """The Flax module named by config.model.name, configured by the rest of config.model;
  with a pipeline (ar_jax.parallel.pipeline.Pipeline), its layer stack split over the
  stages."""
  module, cfg = build_config(model_config, vocab_size, eos_id, pipeline)
  return module.Model(cfg, deterministic=deterministic)


def size(model_config: Any, vocab_size: int, seq_len: int) -> tuple[int, float]:
  """(parameters, forward FLOPs per token at seq_len) of a config.model, from shapes alone:
  what studies match models on and count compute with."""
  model = get_model(model_config, vocab_size)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes['params'])))
  return params, float(model.flops_per_token(seq_len))
