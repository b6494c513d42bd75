"""AdamW with linear warmup, cosine decay and global-norm clipping."""

from typing import Any

import jax
import optax

from ar_jax.errors import check

# Parameters never decayed, by name, in every family: norm scales (and biases, any name
# ending in 'bias'), as nanoGPT. A family adds its own (contract.Capabilities.no_decay).
NO_DECAY = ('scale',)


def warmup_steps(optim: Any, num_train_steps: int) -> int:
  """optim.warmup_steps, or a tenth of the decay when it would not end before the decay does
  (a run shortened from the command line keeps a warmup in proportion)."""
  decay_steps = optim.decay_steps or num_train_steps
  return optim.warmup_steps if optim.warmup_steps < decay_steps else decay_steps // 10


def schedule(optim: Any, num_train_steps: int) -> optax.Schedule:
  """0 -> learning_rate over the warmup, then cosine down to min_learning_rate at decay_steps."""
  check(optim.warmup_steps >= 0, f'optim.warmup_steps must be >= 0, got {optim.warmup_steps}')
  check(optim.decay_steps >= 0, f'optim.decay_steps must be >= 0, got {optim.decay_steps}')
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=optim.learning_rate,
    warmup_steps=warmup_steps(optim, num_train_steps),
    decay_steps=optim.decay_steps or num_train_steps,
    end_value=optim.min_learning_rate,
  )


def decay_mask(no_decay: tuple[str, ...] = ()):
  """The mask of weight decay: on matrices and embeddings (positions too), never on biases,
  norm scales (NO_DECAY) or the family's `no_decay` names (a recurrence's decay rates).

  Decided by parameter name, not rank: with scanned layers a bias has a layer axis too.
  """
  exempt = set(NO_DECAY) | set(no_decay)

  def name(path):  # the innermost dict key: boxes for logical axes add attribute keys
    return next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey))

  def decayed(path, _):
    return not (name(path) in exempt or name(path).endswith('bias'))

  return lambda params: jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(
  optim: Any, num_train_steps: int, no_decay: tuple[str, ...] = ()
) -> optax.GradientTransformation:
  """AdamW on `optim`'s settings; `no_decay`: the family's parameter names exempt from weight
  decay (models.capabilities(name).no_decay)."""
  check(optim.learning_rate > 0, f'optim.learning_rate must be positive, got {optim.learning_rate}')
  check(optim.grad_clip_norm >= 0, f'optim.grad_clip_norm must be >= 0, got {optim.grad_clip_norm}')
  adamw = optax.adamw(
    schedule(optim, num_train_steps),
    b1=optim.b1,
    b2=optim.b2,
    eps=optim.eps,
    weight_decay=optim.weight_decay,
    mask=decay_mask(no_decay),
  )
  if optim.grad_clip_norm:
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), adamw)
  return adamw
