"""Scheduled sampling (Bengio et al. 2015), an answer to exposure bias: a model trained only
on true prefixes is sampled on its own.

With probability eps(step) the model's own sampled token replaces the ground-truth input.
Recurrent models do it exactly: one position at a time through the cached step, each input
drawn from the logits the model just produced. Parallel families (transformer, convolutions)
use the standard two-pass approximation: a teacher-forced pass without gradient proposes a
sample at every position, and the training pass runs on the mixed inputs.

Dimension legend: B batch, T time, V vocab.
"""

import math
from typing import Any

import jax
import jax.numpy as jnp

from ar_jax.errors import check

SCHEDULES = ('none', 'constant', 'linear', 'inverse_sigmoid')


def validate(ss: Any) -> None:
  check(
    ss.schedule in SCHEDULES,
    f'scheduled_sampling.schedule={ss.schedule!r}; allowed: ' + ', '.join(SCHEDULES),
  )
  check(
    0.0 <= ss.max_prob <= 1.0, f'scheduled_sampling.max_prob must be in [0, 1], got {ss.max_prob}'
  )
  check(ss.steps > 0, f'scheduled_sampling.steps must be positive, got {ss.steps}')


def probability(ss: Any, step: jax.Array) -> jax.Array:
  """eps(step): the chance that an input is the model's own sample instead of the truth."""
  step = jnp.asarray(step, jnp.float32)
  if ss.schedule == 'constant':
    return jnp.asarray(ss.max_prob, jnp.float32)
  if ss.schedule == 'linear':  # 0 at step 0, max_prob from `steps` on
    return ss.max_prob * jnp.minimum(step / ss.steps, 1.0)
  # Bengio et al.'s inverse sigmoid decay of the teacher-forcing probability, k = steps / 10:
  # eps rises from about 0 to max_prob, half way at step k log k.
  k = ss.steps / 10.0
  return ss.max_prob * (1.0 - k / (k + jnp.exp(jnp.minimum(step / k, math.log(1e30)))))


def two_pass(apply, tokens_BT: jax.Array, eps: jax.Array, rng: jax.Array) -> jax.Array:
  """Logits of a pass on inputs where each position after the first holds, with probability
  eps, a sample from a teacher-forced pass (no gradient flows through the samples)."""
  sample_rng, coin_rng = jax.random.split(rng)
  proposals_BTV = jax.lax.stop_gradient(apply(tokens_BT))
  # The logits at t - 1 propose the token at t.
  samples_BT = jax.random.categorical(sample_rng, proposals_BTV[:, :-1]).astype(tokens_BT.dtype)
  coins_BT = jax.random.bernoulli(coin_rng, eps, samples_BT.shape)
  mixed_BT = tokens_BT.at[:, 1:].set(jnp.where(coins_BT, samples_BT, tokens_BT[:, 1:]))
  return apply(mixed_BT)


def step_by_step(step, tokens_BT: jax.Array, cache: Any, eps: jax.Array, rng: jax.Array):
  """Exact scheduled sampling through a cached step (cache, tokens_B1) -> (logits, cache).

  Returns (logits_BTV, the cache after the last position, the inputs actually fed [B, T]).
  """
  B, T = tokens_BT.shape

  def one(carry, inputs):
    cache, previous_B = carry
    truth_B, t = inputs
    coin_rng, sample_rng = jax.random.split(jax.random.fold_in(rng, t))
    own = (t > 0) & jax.random.bernoulli(coin_rng, eps, (B,))
    token_B = jnp.where(own, previous_B, truth_B)
    logits_B1V, cache = step(token_B[:, None], cache, t)
    sample_B = jax.random.categorical(sample_rng, logits_B1V[:, 0]).astype(tokens_BT.dtype)
    return (cache, jax.lax.stop_gradient(sample_B)), (logits_B1V[:, 0], token_B)

  start = (cache, jnp.zeros((B,), tokens_BT.dtype))
  (cache, _), (logits_TBV, fed_TB) = jax.lax.scan(one, start, (tokens_BT.T, jnp.arange(T)))
  return jnp.swapaxes(logits_TBV, 0, 1), cache, fed_TB.T
