"""Training objectives: what a train step differentiates, chosen once when the trainer is
built (`make`), so the step itself reads grad -> update -> skip.

An objective is objective(params, batch_BT, carry, rng, step) -> (loss, carry): the mean token
cross-entropy of the batch's windows (inputs [:, :-1], targets [:, 1:]), and the state the
next batch continues from (None unless training is stateful).

  teacher forcing   the logits of the true inputs; with packed documents each window's
                    documents are kept apart (segment ids from the end-of-document token)
  stateful          the same through the cached step, each row continuing its stream from the
                    carried state; gradients stop at the window (truncated BPTT)
  scheduled sampling (Bengio et al. 2015), an answer to exposure bias: with probability
                    eps(step) an input is the model's own sample instead of the truth.
                    Exact for sequential families (one position at a time through the cached
                    step, each input drawn from the logits just produced); the two-pass
                    approximation for the parallel ones (a teacher-forced pass without
                    gradient proposes a sample at every position, and the training pass runs
                    on the mixed inputs)

`accumulate` runs any of them over microbatches.

Dimension legend: B batch, T time, V vocab.
"""

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ar_jax.data import batches
from ar_jax.errors import check

Objective = Callable[..., tuple[jax.Array, Any]]
SCHEDULES = ('none', 'constant', 'linear', 'inverse_sigmoid')


def make(model, config, packed_eos: int | None) -> Objective:
  """The objective of a run: its model (with dropout when training has it), config
  (stateful, scheduled_sampling) and packed_eos (the token that starts each packed document,
  or None)."""
  ss = config.scheduled_sampling
  check(
    not (ss.schedule != 'none' and config.stateful and not model.sequential),
    'scheduled sampling with a carried state needs a recurrent model',
  )

  def objective(params, batch_BT, carry, rng, step):
    dropout_rng, sampling_rng = jax.random.split(rng)

    def apply(tokens_BT, *cache, rng=dropout_rng, **kw):
      return model.apply({'params': params}, tokens_BT, *cache, rngs={'dropout': rng}, **kw)

    inputs_BT = batch_BT[:, :-1]
    # The cached step (recurrent models) resets its state at eos without being told.
    packed = batches.segments(inputs_BT, packed_eos)
    if ss.schedule != 'none':
      eps = probability(ss, step)
      if model.sequential:  # exact, one step at a time
        cache = model.init_cache(*inputs_BT.shape) if carry is None else carry
        step_fn = lambda t_B1, c, t: apply(
          t_B1, jax.lax.stop_gradient(c), rng=jax.random.fold_in(dropout_rng, t), method=model.step
        )
        logits_BTV, cache, _ = step_by_step(step_fn, inputs_BT, cache, eps, sampling_rng)
        carry = None if carry is None else cache
      else:
        logits_BTV = two_pass(functools.partial(apply, **packed), inputs_BT, eps, sampling_rng)
    elif carry is None:
      logits_BTV = apply(inputs_BT, **packed)
    else:
      logits_BTV, carry = apply(inputs_BT, jax.lax.stop_gradient(carry), method=model.step)
    total, count = cross_entropy(logits_BTV, batch_BT[:, 1:])
    return total / count, carry

  return objective


@jax.custom_vjp
def token_nll(logits_BTV, targets_BT):
  """-log softmax(logits)[target] per token, in float32 (or wider) whatever the logits are.

  Its gradient, softmax(logits) - onehot(target), is written in one pass over the logits, in
  their dtype: autodiff of the same formula (optax's) materialises float32 logits and their
  float32 cotangent, each as large as the logits of a whole batch over the vocabulary.
  Equal to optax.softmax_cross_entropy_with_integer_labels, values and gradients."""
  return _nll_forward(logits_BTV, targets_BT)[0]


def _nll_forward(logits_BTV, targets_BT):
  wide_BTV = logits_BTV.astype(jnp.promote_types(jnp.float32, logits_BTV.dtype))
  lse_BT = jax.nn.logsumexp(wide_BTV, axis=-1)
  target_BT = jnp.take_along_axis(wide_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return lse_BT - target_BT, (logits_BTV, targets_BT, lse_BT)


def _nll_backward(residuals, g_BT):
  logits_BTV, targets_BT, lse_BT = residuals
  probs_BTV = jnp.exp(logits_BTV.astype(lse_BT.dtype) - lse_BT[..., None])
  onehot_BTV = targets_BT[..., None] == jnp.arange(logits_BTV.shape[-1])
  grad_BTV = (probs_BTV - onehot_BTV) * g_BT[..., None]
  return grad_BTV.astype(logits_BTV.dtype), None


token_nll.defvjp(_nll_forward, _nll_backward)


def cross_entropy(logits_BTV, targets_BT, weights_BT=None):
  """(sum of token losses, sum of weights); the loss is float32 whatever the logits were."""
  losses_BT = token_nll(logits_BTV, targets_BT)
  if weights_BT is None:
    weights_BT = jnp.ones_like(losses_BT)
  return jnp.sum(losses_BT * weights_BT), jnp.sum(weights_BT)


def accumulate(grad_fn, params, batch_BT, carry, rng, steps: int, cache_batch_axis: int):
  """((loss, carry), grads) of grad_fn(params, batch, carry, rng) over `steps` microbatches:
  gradients and losses averaged (every microbatch has the same token count, so this is the
  token-weighted mean), the carry split along its batch axis and put back together. Row r
  goes to microbatch r % steps, so every device keeps its share of each one."""
  if steps == 1:
    return grad_fn(params, batch_BT, carry, rng)

  def split(x, axis=0):
    return jnp.moveaxis(x.reshape(*x.shape[:axis], -1, steps, *x.shape[axis + 1 :]), axis + 1, 0)

  def merge(c, axis):
    return jnp.moveaxis(c, 0, axis + 1).reshape(*c.shape[1 : axis + 1], -1, *c.shape[axis + 2 :])

  axis = cache_batch_axis
  carries = jax.tree.map(lambda c: split(c, axis) if c.ndim else c, carry)

  def micro(grads_sum, inputs):
    micro_BT, carry, i = inputs
    (loss, carry), grads = grad_fn(params, micro_BT, carry, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, grads_sum, grads), (loss, carry)

  zeros = jax.tree.map(jnp.zeros_like, params)
  grads, (losses, carries) = jax.lax.scan(
    micro, zeros, (split(batch_BT), carries, jnp.arange(steps))
  )
  carry = jax.tree.map(lambda c: merge(c, axis) if c.ndim > 1 else c[0], carries)
  return (losses.mean(), carry), jax.tree.map(lambda g: g / steps, grads)


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
