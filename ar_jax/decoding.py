"""Generation for any model that implements the model contract's cached step (scoring, by
the full forward, is in scoring.py).

Strategies: greedy (temperature 0), ancestral sampling, and its filters in one order:
temperature first (softmax(logits / temperature)), then top-k, then top-p (the smallest set
of tokens whose probability reaches p); and beam search with the GNMT length penalty.

Prompts of different lengths share a batch without left padding: the shortest common prefix
is prefilled in one cached step, then every row advances one position per step, fed its own
prompt token while it is still inside its prompt and its chosen token after. All rows stay at
one position (the transformer's cache keeps one index for the batch), and a recurrent carry
sees exactly its own tokens. Nothing here knows the family: caches are copied and reordered
along `model.cache_batch_axis`.

Dimension legend: B prompts, N samples per prompt, W beams, R rows decoded together (B * N or
B * W), P longest prompt, L = P + new tokens, C continuation, V vocab, K beam candidates.
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ar_jax.errors import check


class Generation(NamedTuple):
  """Sequences laid out as their prompt, then their continuation, then zeros.

  generate: [B * N] rows (sample n of prompt b is row b * N + n); beam_search: [B, W], the
  best hypothesis first. log_probs: log p(token | prefix) of each generated token under the
  model's own distribution (no temperature, no filter), 0 at prompt and padding positions.
  lengths: prompt + continuation, an end-of-sequence token included. scores: the sum of
  log_probs; beam search divides it by the length penalty (-inf: fewer hypotheses than W).
  """

  tokens: jax.Array  # [..., L] int32
  log_probs: jax.Array  # [..., L] float32
  lengths: jax.Array  # [...] int32
  scores: jax.Array  # [...] float32


def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Logits scaled by temperature, with the tokens top-k and top-p exclude set to -inf."""
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if 0 < top_k < logits_BV.shape[-1]:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    # Keep a token while the probability of the tokens ranked above it is still below p.
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    threshold_B1 = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), -1, keepdims=True)
    logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
  return logits_BV


def sample_token(
  logits_BV: jax.Array, rng: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
  """One token per row: the argmax at temperature 0, else a draw from the filtered logits."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  filtered = filter_logits(logits_BV, temperature, top_k, top_p)
  return jax.random.categorical(rng, filtered).astype(jnp.int32)


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016); beam scores are log p divided by it."""
  return ((5.0 + length) / 6.0) ** alpha


def generate(
  model: Any,
  params: Any,
  prompts_BP: jax.Array,
  max_new_tokens: int,
  rng: jax.Array,
  *,
  prompt_lengths: Any = None,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  eos_id: int | None = None,
  num_samples: int = 1,
) -> Generation:
  """Continues each prompt by up to max_new_tokens, stopping a row at eos_id.

  prompts_BP is padded on the right; prompt_lengths [B] (default: all P) says where each
  prompt ends. Greedy at temperature 0, else sampled (see the module docstring for the
  order of the filters). num_samples continuations of each prompt share its prefill.
  """
  check(temperature >= 0.0, f'temperature must be >= 0, got {temperature}')
  check(top_k >= 0, f'top_k must be >= 0, got {top_k}')
  check(0.0 < top_p <= 1.0, f'top_p must be in (0, 1], got {top_p}')
  check(num_samples >= 1, f'num_samples must be positive, got {num_samples}')
  prompts_BP, lengths_B, shortest = _checked_prompts(
    model, prompts_BP, prompt_lengths, max_new_tokens
  )
  return _generate(
    model,
    params,
    prompts_BP,
    lengths_B,
    rng,
    max_new_tokens=max_new_tokens,
    shortest=shortest,
    num_samples=num_samples,
    temperature=float(temperature),
    top_k=top_k,
    top_p=float(top_p),
    eos_id=_eos(eos_id),
  )


def beam_search(
  model: Any,
  params: Any,
  prompts_BP: jax.Array,
  max_new_tokens: int,
  *,
  beam_size: int,
  length_penalty_alpha: float = 0.6,
  prompt_lengths: Any = None,
  eos_id: int | None = None,
) -> Generation:
  """The beam_size best continuations of each prompt, [B, W], best first.

  A hypothesis ends at eos_id (kept, included in its length) or after max_new_tokens; its
  score is its log-probability divided by length_penalty(new tokens, alpha). A prompt's
  search stops once no unfinished beam can beat its W-th finished hypothesis.
  """
  check(beam_size >= 1, f'beam_size must be positive, got {beam_size}')
  # Log-probabilities only fall as a beam grows, so with alpha >= 0 a beam's score now,
  # divided by the longest length's penalty, bounds every score it can reach: the stop rule.
  check(
    length_penalty_alpha >= 0.0,
    f'the length penalty alpha must be >= 0, got {length_penalty_alpha}',
  )
  prompts_BP, lengths_B, shortest = _checked_prompts(
    model, prompts_BP, prompt_lengths, max_new_tokens
  )
  return _beam_search(
    model,
    params,
    prompts_BP,
    lengths_B,
    max_new_tokens=max_new_tokens,
    shortest=shortest,
    beam_size=beam_size,
    alpha=float(length_penalty_alpha),
    eos_id=_eos(eos_id),
  )


def _eos(eos_id: int | None) -> jax.Array:
  """An argument, not a compile-time constant; -1 (no token id) for none."""
  return jnp.int32(-1 if eos_id is None else eos_id)


def checked_lengths(lengths: Any, batch: int, width: int, what: str) -> np.ndarray:
  """Lengths [B] as numpy, checked against their padded width."""
  lengths_B = np.full(batch, width) if lengths is None else np.asarray(lengths)
  check(lengths_B.shape == (batch,), f'{what}_lengths has shape {lengths_B.shape}, not ({batch},)')
  check(
    lengths_B.min() >= 0 and lengths_B.max() <= width,
    f'{what}_lengths must be in [0, {width}] (the padded width), got {lengths_B.tolist()}',
  )
  return lengths_B


def _checked_prompts(model, prompts_BP, prompt_lengths, max_new_tokens):
  """(prompts cut to the longest, lengths [B], the shortest length), checked against the
  model's context."""
  prompts_BP = jnp.asarray(prompts_BP, jnp.int32)
  check(prompts_BP.ndim == 2, f'prompts must be [batch, length], got shape {prompts_BP.shape}')
  lengths_B = checked_lengths(prompt_lengths, *prompts_BP.shape, 'prompt')
  check(lengths_B.min() >= 1, 'generation needs a prompt of at least one token in every row')
  check(max_new_tokens >= 1, f'max_new_tokens must be positive, got {max_new_tokens}')
  P = int(lengths_B.max())
  if model.max_len:
    check(
      P + max_new_tokens <= model.max_len,
      f'prompt of {P} tokens + {max_new_tokens} new tokens = {P + max_new_tokens} exceeds the '
      f"model's context of {model.max_len} positions",
    )
  return prompts_BP[:, :P], jnp.asarray(lengths_B, jnp.int32), int(lengths_B.min())


def _prefill(model, params, prompts_BP, lengths_B, max_new_tokens, shortest):
  """(prompts [B, L], zeros past each length; logits [B, V] for position `shortest`; cache)."""
  B, P = prompts_BP.shape
  L = P + max_new_tokens
  padded_BL = jnp.pad(prompts_BP, ((0, 0), (0, max_new_tokens)))
  prompts_BL = jnp.where(jnp.arange(L) < lengths_B[:, None], padded_BL, 0)
  cache = model.init_cache(B, L)
  logits_BTV, cache = model.apply(
    {'params': params}, prompts_BL[:, :shortest], cache, method=model.step
  )
  return prompts_BL, logits_BTV[:, -1], cache


def _repeat_rows(model, cache, n):
  """The cache with each row repeated n times in place (row b becomes rows b*n .. b*n+n-1)."""
  axis = model.cache_batch_axis
  return jax.tree.map(lambda a: a if a.ndim == 0 else jnp.repeat(a, n, axis=axis), cache)


def _decode(model, params, choose, state, cache, logits_RV, start, stop):
  """Runs choose(t, logits_RV, state, cache) -> (state, cache, tokens_R, all_done) at
  position start, then at each later position after feeding it the tokens it chose, in one
  compiled loop, until every row is done or position stop. Returns the last state."""

  def cond(carry):
    t, *_, all_done = carry
    return (t < stop) & ~all_done

  def body(carry):
    t, state, cache, tokens_R, _ = carry
    logits_R1V, cache = model.apply({'params': params}, tokens_R[:, None], cache, method=model.step)
    return (t + 1, *choose(t, logits_R1V[:, 0], state, cache))

  carry = (jnp.int32(start + 1), *choose(start, logits_RV, state, cache))
  return jax.lax.while_loop(cond, body, carry)[1]


@functools.partial(
  jax.jit,
  static_argnames=(
    'model',
    'max_new_tokens',
    'shortest',
    'num_samples',
    'temperature',
    'top_k',
    'top_p',
  ),
)
def _generate(
  model,
  params,
  prompts_BP,
  lengths_B,
  rng,
  *,
  max_new_tokens,
  shortest,
  num_samples,
  temperature,
  top_k,
  top_p,
  eos_id,
):
  prompts_BL, logits_BV, cache = _prefill(
    model, params, prompts_BP, lengths_B, max_new_tokens, shortest
  )
  # The samples of a prompt share its prefill: rows are copied after it, not before.
  prompts_RL, logits_RV, prompt_R = (
    jnp.repeat(a, num_samples, axis=0) for a in (prompts_BL, logits_BV, lengths_B)
  )
  cache = _repeat_rows(model, cache, num_samples)
  limit_R = prompt_R + max_new_tokens

  def choose(t, logits_RV, state, cache):
    tokens_RL, log_probs_RL, lengths_R, done_R = state
    in_prompt_R = t < prompt_R
    live_R = ~in_prompt_R & ~done_R
    sampled_R = sample_token(logits_RV, jax.random.fold_in(rng, t), temperature, top_k, top_p)
    token_R = jnp.where(in_prompt_R, tokens_RL[:, t], jnp.where(live_R, sampled_R, 0))
    log_p_R = jnp.take_along_axis(jax.nn.log_softmax(logits_RV), token_R[:, None], -1)[:, 0]
    state = (
      tokens_RL.at[:, t].set(token_R),
      log_probs_RL.at[:, t].set(jnp.where(live_R, log_p_R, 0.0)),
      jnp.where(live_R, t + 1, lengths_R),
      done_R | (live_R & ((token_R == eos_id) | (t + 1 >= limit_R))),
    )
    return state, cache, token_R, jnp.all(state[3])

  state = (
    prompts_RL,
    jnp.zeros(prompts_RL.shape, jnp.float32),
    prompt_R,
    jnp.zeros(prompt_R.shape, bool),
  )
  tokens_RL, log_probs_RL, lengths_R, _ = _decode(
    model, params, choose, state, cache, logits_RV, shortest, prompts_RL.shape[1]
  )
  return Generation(tokens_RL, log_probs_RL, lengths_R, log_probs_RL.sum(-1))


class _Beams(NamedTuple):
  """Per prompt: W unfinished beams (score: their log-probability) and the W best finished
  hypotheses (score: divided by the length penalty), each best first."""

  alive_tokens: jax.Array  # [B, W, L]
  alive_log_probs: jax.Array  # [B, W, L]
  alive_scores: jax.Array  # [B, W]
  finished: Generation  # [B, W, ...]


@functools.partial(
  jax.jit, static_argnames=('model', 'max_new_tokens', 'shortest', 'beam_size', 'alpha')
)
def _beam_search(
  model, params, prompts_BP, lengths_B, *, max_new_tokens, shortest, beam_size, alpha, eos_id
):
  prompts_BL, logits_BV, cache = _prefill(
    model, params, prompts_BP, lengths_B, max_new_tokens, shortest
  )
  (B, L), W = prompts_BL.shape, beam_size
  logits_RV = jnp.repeat(logits_BV, W, axis=0)
  cache = _repeat_rows(model, cache, W)
  limit_B = lengths_B + max_new_tokens
  best_penalty = length_penalty(max_new_tokens, alpha)

  def take(a_BK, index_BW):
    """Entries [b, index[b, w]] of a [B, K, ...] array."""
    return jax.vmap(lambda a, i: a[i])(a_BK, index_BW)

  def choose(t, logits_RV, beams, cache):
    V = logits_RV.shape[-1]
    in_prompt_B = t < lengths_B
    log_p_BWV = jax.nn.log_softmax(logits_RV).reshape(B, W, V)
    # Inside its prompt, a row's one continuation is its prompt token, at no cost.
    forced_BV = jnp.where(jnp.arange(V) == prompts_BL[:, t, None], 0.0, -jnp.inf)
    log_p_BWV = jnp.where(in_prompt_B[:, None, None], forced_BV[:, None], log_p_BWV)
    # 2W candidates: at most W of them end here (one eos per beam), so W can go on.
    candidates_BK, index_BK = jax.lax.top_k(
      (beams.alive_scores[:, :, None] + log_p_BWV).reshape(B, W * V), min(2 * W, W * V)
    )
    beam_BK, token_BK = index_BK // V, (index_BK % V).astype(jnp.int32)
    tokens_BKL = take(beams.alive_tokens, beam_BK).at[:, :, t].set(token_BK)
    log_probs_BKL = (
      take(beams.alive_log_probs, beam_BK)
      .at[:, :, t]
      .set(jnp.take_along_axis(log_p_BWV.reshape(B, W * V), index_BK, axis=1))
    )
    ends_BK = ~in_prompt_B[:, None] & ((token_BK == eos_id) | (t + 1 >= limit_B)[:, None])

    alive_scores, pick_BW = jax.lax.top_k(jnp.where(ends_BK, -jnp.inf, candidates_BK), W)
    rows_R = (jnp.arange(B)[:, None] * W + take(beam_BK, pick_BW)).reshape(-1)
    cache = jax.tree.map(
      lambda a: a if a.ndim == 0 else jnp.take(a, rows_R, axis=model.cache_batch_axis), cache
    )

    new_B = t + 1 - lengths_B
    ended_BK = jnp.where(ends_BK, candidates_BK / length_penalty(new_B, alpha)[:, None], -jnp.inf)
    pool = Generation(
      tokens=jnp.concatenate([beams.finished.tokens, tokens_BKL], 1),
      log_probs=jnp.concatenate([beams.finished.log_probs, log_probs_BKL], 1),
      lengths=jnp.concatenate(
        [beams.finished.lengths, jnp.broadcast_to(t + 1, ends_BK.shape).astype(jnp.int32)], 1
      ),
      scores=jnp.concatenate([beams.finished.scores, ended_BK], 1),
    )
    finished_scores, keep_BW = jax.lax.top_k(pool.scores, W)
    finished = Generation(*(take(a, keep_BW) for a in pool[:3]), finished_scores)

    beams = _Beams(take(tokens_BKL, pick_BW), take(log_probs_BKL, pick_BW), alive_scores, finished)
    done_B = (t + 1 >= limit_B) | (finished_scores[:, -1] >= alive_scores[:, 0] / best_penalty)
    return beams, cache, beams.alive_tokens[:, :, t].reshape(-1), jnp.all(done_B)

  tokens_BWL = jnp.repeat(prompts_BL[:, None], W, axis=1)
  # One live beam per prompt at first: the copies would only repeat its candidates.
  alive_scores = jnp.where(jnp.arange(W) == 0, 0.0, -jnp.inf) * jnp.ones((B, 1))
  empty = Generation(
    tokens=tokens_BWL,
    log_probs=jnp.zeros(tokens_BWL.shape, jnp.float32),
    lengths=jnp.zeros((B, W), jnp.int32),
    scores=jnp.full((B, W), -jnp.inf),
  )
  beams = _Beams(tokens_BWL, empty.log_probs, alive_scores, empty)
  return _decode(model, params, choose, beams, cache, logits_RV, shortest, L).finished
