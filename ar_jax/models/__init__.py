"""Models by module name: config.model.name = 'transformer' is ar_jax/models/transformer.py.

Every model module defines a frozen dataclass `Config` (built from config.model, plus the
vocabulary size the data decides) and a Flax module `Model(config)` with the contract:

  __call__(tokens_BT) -> logits_BTV         teacher forcing; position t sees tokens <= t
  init_cache(batch_size, max_len) -> cache  an empty decoding state
  step(tokens_BT, cache) -> (logits_BTV, cache)   T new tokens (prefill, or one)
  flops_per_token(seq_len) -> float         forward FLOPs, for MFU and compute budgets
  max_len                                   the most positions a sequence may have
"""

import dataclasses
import importlib
import pkgutil
from typing import Any

from ar_jax.errors import ConfigError

_NOT_MODELS = frozenset({'layers'})


def available() -> list[str]:
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in _NOT_MODELS)


def build_config(model_config: Any, vocab_size: int):
  """The model module's own Config dataclass from the experiment's config.model."""
  name = model_config.name
  if name not in available():
    raise ConfigError(f'unknown model.name={name!r}; available: {", ".join(available())}')
  module = importlib.import_module(f'{__name__}.{name}')
  fields = {f.name for f in dataclasses.fields(module.Config)} - {'vocab_size'}
  given = {k: v for k, v in model_config.items() if k != 'name'}
  unknown = sorted(set(given) - fields)
  if unknown:
    raise ConfigError(
      f'model {name!r} has no field(s) {", ".join(unknown)}; '
      f'its fields: {", ".join(sorted(fields))}'
    )
  return module, module.Config(vocab_size=vocab_size, **given)


def get_model(model_config: Any, vocab_size: int, *, deterministic: bool = True):
  """The Flax module named by config.model.name, configured by the rest of config.model."""
  module, cfg = build_config(model_config, vocab_size)
  return module.Model(cfg, deterministic=deterministic)
